"""The repository on disk: its layout, config.json and the version policies, without loading a model."""

import json

import pytest

from server.models.repository import ConfigError, ModelConfig, VersionPolicy, model_name, scan, single_file

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("policy", "available", "selected"), [
    (None, [1, 2, 3], {3}),
    ({"latest": {"num_versions": 2}}, [3, 1, 2], {2, 3}),
    ({"latest": {"num_versions": 5}}, [1, 2], {1, 2}),
    ({"all": {}}, [1, 4], {1, 4}),
    ({"specific": {"versions": [1, 3]}}, [1, 2, 3], {1, 3}),
    ({"specific": {"versions": [7]}}, [1, 2], set()),
    (None, [], set()),
])
def test_a_version_policy_selects_like_tritons(policy, available, selected):
    assert VersionPolicy.parse(policy).select(available) == selected


@pytest.mark.parametrize(("policy", "problem"), [
    ({"latest": {"num_versions": 0}}, "positive integer"),
    ({"specific": {"versions": []}}, "list of version numbers"),
    ({"newest": {}}, "unknown version_policy"),
    ({"all": {}, "latest": {}}, "one of"),
])
def test_a_bad_version_policy_says_what_is_wrong(policy, problem):
    with pytest.raises(ConfigError, match=problem):
        VersionPolicy.parse(policy)


def test_a_config_sets_the_default_version_the_batching_limits_and_the_migration():
    config = ModelConfig.parse(json.dumps({"version_policy": {"all": {}}, "default_version": 2,
                                           "batching": {"max_batch_size": 8, "max_batch_delay": 0.001},
                                           "state_migration": "carry"}))
    assert config.policy == VersionPolicy("all")
    assert (config.default_version, config.state_migration) == (2, "carry")
    assert config.limits == {"max_batch_size": 8, "max_batch_delay": 0.001}


@pytest.mark.parametrize(("text", "problem"), [
    ("{", "not JSON"),
    ("[]", "not a JSON object"),
    ('{"versions": 1}', "unknown fields"),
    ('{"batching": {"max_sessions": 1}}', "unknown batching limit"),
    ('{"batching": {"max_batch_size": 0}}', "positive integer"),
    ('{"state_migration": "always"}', "carry"),
    ('{"default_version": -1}', "positive integer"),
])
def test_a_bad_config_says_what_is_wrong(text, problem):
    with pytest.raises(ConfigError, match=problem):
        ModelConfig.parse(text)


def test_scan_finds_models_and_their_integer_versions_only(tmp_path):
    for path in ("a/1/model.pt", "a/2/model.pt", "a/0/model.pt", "a/latest/model.pt", "b/3/model.pt"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"x")
    (tmp_path / "a/4").mkdir()  # no model.pt yet (being copied): not a version
    (tmp_path / "empty").mkdir()
    (tmp_path / "b/config.json").write_text('{"version_policy": {"all": {}}}')
    entries = scan(tmp_path)
    assert sorted(entries["a"].versions) == [1, 2] and entries["a"].selected == {2}
    assert entries["b"].versions == {3: tmp_path / "b/3/model.pt"}
    assert entries["b"].config.policy.kind == "all"
    assert entries["empty"].versions == {}


def test_a_model_with_an_unusable_config_is_listed_with_its_problem(tmp_path):
    (tmp_path / "a/1").mkdir(parents=True)
    (tmp_path / "a/1/model.pt").write_bytes(b"x")
    (tmp_path / "a/config.json").write_text('{"version_policy": "newest"}')
    entry = scan(tmp_path)["a"]
    assert "config.json" in entry.problem and "version_policy" in entry.problem


def test_a_missing_repository_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        scan(tmp_path / "nowhere")


def test_a_single_file_is_one_model_version_one_named_by_its_metadata(demo_model, tmp_path):
    entries = single_file(demo_model)
    assert list(entries) == ["tutorial-lstm"]
    entry = entries["tutorial-lstm"]
    assert entry.versions == {1: demo_model} and not entry.renamed
    (tmp_path / "plain.pt").write_bytes(b"not a zip")
    assert model_name(tmp_path / "plain.pt") == "plain"  # the runtime's load says what is wrong with it
