"""A SuperNode reads its model, data, cache and state paths from its own node config, never from the server's run
config: unit tests of the node-side resolution, a node refusing a hostile setup message, and a run on the user's
own model and files where the server and the nodes each use their own paths."""

from __future__ import annotations

import logging
import tomllib

import pytest

pytest.importorskip("flwr", reason="Flower is not installed: pip install 'cellm[flower]' (make test does)")

import test_flower  # noqa: E402

import cellm  # noqa: E402
from cellm.runtime.flower import node_paths as NP  # noqa: E402
from cellm.runtime.flower import protocol as P  # noqa: E402

flower_env = test_flower.flower_env  # the Flower tests' settings fixture (FLWR_HOME, one torch thread, ...)

PATH_FIELDS = [("model", "path", "model-path"), ("data", "path", "data-path"),
               ("data", "test_path", "data-test-path"), ("data", "cache_dir", "cache-dir")]


@pytest.fixture
def no_node_env(monkeypatch):
    """The node's environment sets none of the path variables (a test may then set one)."""
    for key in NP.FIELDS.values():
        monkeypatch.delenv(NP.env_name(key), raising=False)
    return monkeypatch


# ------------------------------------------------------------------ the node-side resolution

def test_a_run_on_packaged_assets_gets_the_nodes_own_cache_folder(no_node_env):
    sent = {"model": {"name": "tiny-bert", "path": ""}, "data": {"name": "bbc", "cache_dir": "node-config:cache-dir"}}
    got = NP.resolve(sent, {"cache-dir": "/srv/node/cache"})
    assert got["model"]["path"] == "" and "path" not in got["data"] and got["data"]["cache_dir"] == "/srv/node/cache"
    assert sent["data"]["cache_dir"] == "node-config:cache-dir"  # the input is not changed
    # no cache-dir of its own: cellm's default folder, in the node's working directory
    assert NP.resolve(sent, {})["data"]["cache_dir"] == NP.DEFAULT_CACHE_DIR
    assert NP.resolve({"data": {"cache_dir": ""}}, {"cache-dir": ""})["data"]["cache_dir"] == ""  # node: no cache


def test_references_to_node_config_keys_become_the_nodes_own_paths(no_node_env):
    sent = {"model": {"path": "node-config:model-path"},
            "data": {"name": "files", "path": "node-config:data-path", "test_path": "node-config:data-test-path"}}
    node = {"model-path": "/models/mine", "data-path": "/data/train.jsonl", "data-test-path": "/data/test.jsonl",
            "partition-id": 0}
    got = NP.resolve(sent, node)
    assert (got["model"]["path"], got["data"]["path"], got["data"]["test_path"]) == (
        "/models/mine", "/data/train.jsonl", "/data/test.jsonl")
    # the node's environment stands in for a key its node config lacks
    no_node_env.setenv("CELLM_NODE_MODEL_PATH", "/from/env")
    assert NP.resolve(sent, {k: v for k, v in node.items() if k != "model-path"})["model"]["path"] == "/from/env"


@pytest.mark.parametrize(("section", "name", "key"), PATH_FIELDS)
@pytest.mark.parametrize("hostile", ["/etc/shadow", "~/.ssh/id_ed25519", "../../secrets.csv", "relative/dir",
                                     "node-config:state-dir"])
def test_a_path_named_by_the_server_is_refused_with_the_field_named(no_node_env, section, name, key, hostile):
    node = {"model-path": "/m", "data-path": "/d.jsonl", "data-test-path": "/t.jsonl", "cache-dir": "/c"}
    with pytest.raises(NP.NodePathError, match=rf"run config's {section}\.{name} names a path") as err:
        NP.resolve({section: {name: hostile}}, node)
    assert f"node-config:{key}" in str(err.value)  # and says what the server may send instead


def test_a_reference_to_a_key_the_node_does_not_set_is_refused_with_the_key_named(no_node_env):
    with pytest.raises(NP.NodePathError, match=r"model\.path is this node's 'model-path'.*--node-config"):
        NP.resolve({"model": {"path": "node-config:model-path"}}, {"partition-id": 0})


@pytest.mark.parametrize("sent", [{"model": {"path": 7}}, {"data": {"cache_dir": ["/x"]}}, {"data": "files"}])
def test_a_path_field_of_the_wrong_type_is_refused(no_node_env, sent):
    with pytest.raises(NP.NodePathError, match="run config's"):
        NP.resolve(sent, {})


def test_a_node_config_path_that_is_not_a_string_is_refused(no_node_env):
    with pytest.raises(NP.NodePathError, match="node config 'data-path' must be a path"):
        NP.resolve({"data": {"path": "node-config:data-path"}}, {"data-path": 3})


def test_the_server_sends_references_where_its_own_config_has_paths(own_models, own_files):
    cfg = cellm.load_config(preset="tiny", overrides=[
        f"model.path='{own_models['bert']}'", "data.name=files", f"data.path='{own_files['jsonl']}'",
        "data.text_column=text", "data.label_column=label", "data.cache_dir='/server/cache'"])
    sent = tomllib.loads(NP.for_nodes(cfg))
    assert sent["model"]["path"] == "node-config:model-path" and sent["data"]["path"] == "node-config:data-path"
    assert sent["data"]["test_path"] == "" and sent["data"]["cache_dir"] == "node-config:cache-dir"
    assert str(own_models["bert"]) not in NP.for_nodes(cfg) and "/server/cache" not in NP.for_nodes(cfg)
    # a node whose own files are the server's gets back exactly the server's config
    node = {"model-path": str(own_models["bert"]), "data-path": own_files["jsonl"], "cache-dir": "/server/cache"}
    assert cellm.load_config(data=NP.resolve(sent, node)) == cfg


# ------------------------------------------------------------------ the ClientApp refuses a hostile setup message

class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_node_refuses_a_setup_naming_a_path_and_the_server_logs_why(flower_env):
    """The server's setup message carries a config whose data.path is a file of the node's machine: the node
    answers with an error naming the field, and the server logs the refusal and never sends it work."""
    import tomli_w
    from test_flower import LoopbackGrid, tiny

    from cellm.runtime.flower.server_app import CellmStrategy

    grid = LoopbackGrid([{"partition-id": 0, "num-partitions": 1}])
    strategy = CellmStrategy(grid, tiny())
    hostile = tomllib.loads(strategy.toml)
    hostile["model"]["path"] = "/etc"
    strategy.toml = tomli_w.dumps(hostile)
    logger, handler = logging.getLogger("cellm.flower"), _Records()
    logger.addHandler(handler)
    try:
        with pytest.raises(RuntimeError, match="no connected SuperNode serves cellm clients") as err:
            strategy.discover(grid, 0.2)
    finally:
        logger.removeHandler(handler)
    assert "model.path names a path" in strategy.bad_nodes[100] and "/etc" in strategy.bad_nodes[100]
    assert "model.path names a path" in str(err.value)  # the run's error says which node refused and why
    assert any("node 100" in line and "model.path names a path" in line for line in handler.lines)
    assert strategy.node_clients == {} and P.STATE_CONFIG not in grid.nodes[100].state.config_records


# ------------------------------------------------------------------ a run where server and nodes use their own paths

def test_server_and_nodes_each_read_their_own_copy_of_the_users_model_and_file(flower_env, own_models, own_files,
                                                                                tmp_path):
    """The server's config names its files; each node names its own copy in its node config: the run equals the
    embedded engine's. Nodes that do not name a model path are refused at setup, naming the key."""
    import shutil

    from test_flower import LoopbackGrid, assert_same_run

    from cellm.runtime.flower.server_app import DriverOptions, run_server

    cfg = cellm.load_config(preset="tiny", overrides=[
        "rounds=2", f"model.path='{own_models['bert']}'", "data.name=files", f"data.path='{own_files['csv']}'",
        "data.text_column=text", "data.label_column=label", "data.num_clients=4", "fl.clients_per_round=2",
        "data.seq_len=24", "data.min_client_size=2", "fl.local_steps=1", "data.max_test_examples=16",
        f"data.cache_dir='{tmp_path / 'server-cache'}'"])
    embedded = cellm.run(cfg, save=False)
    copies = tmp_path / "node-files"
    shutil.copytree(own_models["bert"], copies / "model")
    shutil.copy(own_files["csv"], copies / "rows.csv")
    nodes = [{"partition-id": i, "num-partitions": 2, "model-path": str(copies / "model"),
              "data-path": str(copies / "rows.csv"), "cache-dir": str(tmp_path / f"cache{i}")} for i in range(2)]
    flower = run_server(LoopbackGrid(nodes), cfg, None, DriverOptions(node_wait_s=5))
    assert_same_run(embedded, flower)
    # the nodes cached where they chose (in this one process, the first node's setup serves both: same config)
    assert any((tmp_path / f"cache{i}").is_dir() for i in range(2))

    without = [{k: v for k, v in n.items() if k != "model-path"} for n in nodes]
    with pytest.raises(RuntimeError, match="no connected SuperNode serves") as err:
        run_server(LoopbackGrid(without), cfg, None, DriverOptions(node_wait_s=0.2))
    assert "model.path is this node" in str(err.value) and "model-path=" in str(err.value)
