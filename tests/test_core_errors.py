"""Bad input gets one clear message naming the problem and the fix, never a traceback."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from matchrt.cli import app
from matchrt.errors import MatchrtError
from matchrt.host import create_host, get_host
from matchrt.weights import WeightMappingError, load_checkpoint, write_random_checkpoint

from toy_plugin import LAYOUT, MissingBackendPlugin, ToyPlugin

runner = CliRunner()


@pytest.fixture()
def toy():
    with get_host().plugin(ToyPlugin(), "toy"):
        yield


@pytest.fixture()
def ckpt(tmp_path):
    return write_random_checkpoint(LAYOUT, tmp_path / "toy.ckpt", lightning=True)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for f in fragments:
        assert f in result.output, result.output


def test_corrupt_checkpoint(toy, tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a zip archive at all")
    r = run("weights", "-m", "toy", "-c", bad)
    assert_clean(r, "cannot read weight file", "corrupt")


class NotTensors:
    pass


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": NotTensors()}, path)
    with pytest.raises(MatchrtError, match="weights_only"):
        load_checkpoint(path)


def test_missing_checkpoint_file(toy, tmp_path):
    r = run("weights", "-m", "toy", "-c", tmp_path / "nope.ckpt")
    assert_clean(r, "not found")


def test_partial_weights_are_an_error_listing_counts(toy, tmp_path):
    sd = {"matcher.conv.weight": torch.zeros(16, 1, 8, 8), "matcher.extra.weight": torch.zeros(3)}
    path = tmp_path / "partial.ckpt"
    torch.save({"state_dict": sd}, path)
    r = run("weights", "-m", "toy", "-c", path)
    assert r.exit_code == 1
    assert "missing: 1" in r.output and "unexpected: 1" in r.output and "conv.bias" in r.output
    r = run("export", "-m", "toy", "-c", path, "-o", tmp_path / "x.onnx")
    assert_clean(r, "1/2 tensors filled", "--allow-partial")


def test_allow_partial_warns_not_silent(toy, tmp_path):
    from matchrt.runner import load_model

    sd = {"matcher.conv.weight": torch.zeros(16, 1, 8, 8)}
    path = tmp_path / "partial.ckpt"
    torch.save(sd, path)
    with pytest.warns(UserWarning, match="partial"):
        load_model(get_host(), "toy", {"checkpoint": path}, allow_partial=True)
    with pytest.raises(WeightMappingError):
        load_model(get_host(), "toy", {"checkpoint": path})


def test_shape_mismatch_is_reported(toy, tmp_path):
    sd = {"matcher.conv.weight": torch.zeros(16, 3, 8, 8), "matcher.conv.bias": torch.zeros(16)}
    path = tmp_path / "wrong.ckpt"
    torch.save(sd, path)
    r = run("weights", "-m", "toy", "-c", path)
    assert r.exit_code == 1 and "shape mismatch matcher.conv.weight" in r.output


def test_non_image_is_refused(toy, ckpt, tmp_path, image_pair):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    r = run("match", image_pair[0], text, "-m", "toy", "-c", ckpt)
    assert_clean(r, "cannot read", "notes.jpg")


def test_wrong_side_multiple_names_nearest_sizes(toy, ckpt, tmp_path):
    r = run("export", "-m", "toy", "-c", ckpt, "--height", 60, "-o", tmp_path / "x.onnx")
    assert_clean(r, "--height 60 is not a multiple of 8", "56 or 64")


def test_unknown_matcher(toy):
    assert_clean(run("info", "-m", "nosuch"), "unknown matcher 'nosuch'", "toy")


def test_missing_backend_gives_install_hint(toy, ckpt, image_pair):
    with get_host().plugin(MissingBackendPlugin(), "ghost"):
        r = run("match", *image_pair, "-m", "toy", "-c", ckpt, "--backend", "ghostrt")
    assert_clean(r, "not usable here", "pip install ghostrt")


def test_tensorrt_backend_missing_here_is_explained(toy, ckpt, image_pair, tmp_path):
    pytest.importorskip("matchrt.backends.tensorrt_backend")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    r = run("build", "--onnx", tmp_path / "x.onnx", "--backend", "tensorrt")
    assert_clean(r, "tensorrt")


def test_missing_weights_flag_says_which(toy):
    from matchrt.runner import resolve_weights

    with pytest.raises(MatchrtError, match="needs --checkpoint"):
        resolve_weights(get_host().matcher("toy"), {})


def test_broken_third_party_plugin_warns_and_cli_lives(monkeypatch):
    import importlib.metadata as md

    class FakeEP:
        name, value, group = "broken", "nonexistent_module_xyz", "matchrt"

        class dist:
            name, version = "broken-plugin", "0.1"

        def load(self):
            raise ImportError("no module named nonexistent_module_xyz")

    real = md.entry_points

    def fake(**kw):
        return list(real(**kw)) + [FakeEP()]

    monkeypatch.setattr(md, "entry_points", fake)
    monkeypatch.setenv("MATCHRT_PLUGINS", "broken")
    with pytest.warns(UserWarning, match="'broken'.*failed to load"):
        host = create_host()
    assert host.records["broken"].error
    assert "torch" in host.backends()


def test_misspelt_hook_fails_loudly(monkeypatch):
    import importlib.metadata as md
    import types

    import matchrt

    module = types.ModuleType("typo_plugin")

    @matchrt.hookimpl
    def postproces(matcher, outputs, pair, options):  # misspelt on purpose
        return None

    module.postproces = postproces

    class FakeEP:
        name, value, group = "typo", "typo_plugin", "matchrt"

        class dist:
            name, version = "typo-plugin", "0.1"

        def load(self):
            return module

    real = md.entry_points
    monkeypatch.setattr(md, "entry_points", lambda **kw: list(real(**kw)) + [FakeEP()])
    monkeypatch.setenv("MATCHRT_PLUGINS", "typo")
    with pytest.warns(UserWarning, match="typo.*postproces"):
        host = create_host()
    assert not host.pm.is_registered(module)


def test_matchrt_plugins_env_limits_third_parties(monkeypatch):
    import importlib.metadata as md

    loaded = []

    class FakeEP:
        group = "matchrt"

        def __init__(self, name):
            self.name, self.value = name, name

        class dist:
            name, version = "third-party", "1.0"

        def load(self):
            loaded.append(self.name)
            return type("P", (), {})()

    real = md.entry_points
    monkeypatch.setattr(md, "entry_points",
                        lambda **kw: list(real(**kw)) + [FakeEP("a"), FakeEP("b")])
    monkeypatch.setenv("MATCHRT_PLUGINS", "b")
    create_host()
    assert loaded == ["b"]
    loaded.clear()
    monkeypatch.setenv("MATCHRT_PLUGINS", "")
    host = create_host()
    assert loaded == [] and "torch" in host.backends()  # built-ins always load
