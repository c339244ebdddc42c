"""The round of CELLM/FLASC as functions any runtime calls: the client update and the server round.

They combine the pure core with a model; they hold no transport and no files.
"""
