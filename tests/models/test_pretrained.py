"""The authors' released weights by name (``fishnet99``, ``fishnet150.welltrained_in1k``, ...): downloaded once from
the URL in timm's pretrained_cfg into torch's hub cache, checked before use, and usable offline when put there by
hand. A local HTTP server stands in for the authors' Dropbox, serving an official-layout FishNet-99 file."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections import Counter
from functools import partial

import pytest
import timm
import torch

import fishnet_pl
from fishnet_pl.models import pretrained
from fishnet_pl.models.official import official_name
from fishnet_pl.models.pretrained import FILE_SHA256
from fishnet_pl.models.weights import load_backbone_weights

from .conftest import official_random_state_dict

TAG, FILE = "fishnet99.in1k", "fishnet99_ckpt.tar"


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory):
    """The folder the server serves: the released file (official layout, as the authors saved it) and bad copies."""
    root = tmp_path_factory.mktemp("dropbox")
    torch.save({"epoch": 100, "arch": "fishnet99", "best_prec1": 77.41,
                "state_dict": official_random_state_dict("fishnet99")}, root / FILE)
    data = (root / FILE).read_bytes()
    (root / "truncated" / FILE).parent.mkdir()
    (root / "truncated" / FILE).write_bytes(data[: len(data) // 2])
    return root


class Server:
    """``http.server`` on 127.0.0.1 in a thread, counting the requests per path."""

    def __init__(self, root):
        hits = self.hits = Counter()

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                hits[self.path.split("?")[0]] += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_port}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(served_dir):
    server = Server(served_dir)
    yield server
    server.stop()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch's hub cache folder for released weights, under a TORCH_HOME of this test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def serve_tag_from(monkeypatch, url: str) -> None:
    """Point the tag's pretrained_cfg (timm's registry entry, shared by ``fishnet99``) at ``url``, Dropbox-style."""
    cfg = timm.models._registry._model_pretrained_cfgs[TAG]
    assert timm.models._registry._model_pretrained_cfgs["fishnet99"] is cfg  # the bare name is the default tag
    monkeypatch.setattr(cfg, "url", url + "?dl=1")


@pytest.fixture
def url(server, monkeypatch):
    serve_tag_from(monkeypatch, f"{server.base}/{FILE}")
    return f"{server.base}/{FILE}?dl=1"


def served_state(served_dir) -> dict[str, torch.Tensor]:
    return torch.load(served_dir / FILE, weights_only=True)["state_dict"]


def assert_holds_the_served_weights(model, served_dir) -> None:
    served = served_state(served_dir)
    for key, value in model.state_dict().items():
        assert torch.equal(value, served[f"module.{official_name(key)}"]), key


def test_the_authors_releases_are_timm_tags_with_their_dropbox_files():
    assert timm.list_pretrained("fishnet*") == ["fishnet99.in1k", "fishnet150.in1k", "fishnet150.welltrained_in1k",
                                                "fishnet201.welltrained_in1k"]
    assert timm.models.get_pretrained_cfg("fishnet150").tag == "in1k"  # the default tag
    assert timm.models.get_pretrained_cfg("fishnet201").tag == "welltrained_in1k"  # the only FishNet-201 release
    assert timm.models.get_pretrained_cfg("fishnet150.welltrained_in1k").url == \
        "https://www.dropbox.com/s/ajy9p6f97y45f1r/fishnet150_ckpt_welltrained.tar?dl=1"
    assert pretrained.weight_names() == ["fishnet99", "fishnet99.in1k", "fishnet150", "fishnet150.in1k",
                                         "fishnet150.welltrained_in1k", "fishnet201", "fishnet201.welltrained_in1k"]


def test_first_use_downloads_into_the_hub_cache_and_later_uses_make_no_request(url, server, served_dir, hub, capfd):
    path = pretrained.resolve_weights("fishnet99")
    assert path == str(hub / FILE) and server.hits[f"/{FILE}"] == 1
    assert "100%" in capfd.readouterr().err  # torch.hub's progress bar
    assert sorted(p.name for p in hub.iterdir()) == [FILE]  # no partial download left behind

    model = fishnet_pl.fishnet99()
    load_backbone_weights(model, "fishnet99", TAG)  # the tag and the bare name share the file
    assert_holds_the_served_weights(model, served_dir)
    assert server.hits[f"/{FILE}"] == 1


def test_timm_pretrained_true_uses_the_same_checked_cache(url, server, served_dir, hub):
    model = timm.create_model("fishnet99", pretrained=True)
    assert model.pretrained_cfg["file"] == str(hub / FILE)
    assert_holds_the_served_weights(model, served_dir)
    ten = timm.create_model("fishnet99.in1k", pretrained=True, num_classes=10)  # a new classifier, weights cached
    torch.testing.assert_close(ten.pre_logits[2].weight, model.pre_logits[2].weight)
    assert server.hits[f"/{FILE}"] == 1


def test_module_backbone_weights_takes_a_released_name(url, server, served_dir, hub):
    from fishnet_pl.module import FishNetModule

    module = FishNetModule(backbone="fishnet99", num_classes=10, backbone_weights="fishnet99")
    served = served_state(served_dir)
    torch.testing.assert_close(module.backbone.stem.conv1[0].weight, served["module.conv1.0.weight"])
    torch.testing.assert_close(module.backbone.bridge.blocks[0].conv2.weight,
                               served["module.fish.fish.3.2.0.conv2.weight"])
    assert module.backbone.get_classifier().out_channels == 10 and server.hits[f"/{FILE}"] == 1


def test_offline_says_which_url_to_open_and_where_to_put_the_file(url, server, served_dir, hub):
    server.stop()
    with pytest.raises(ConnectionError) as err:
        pretrained.resolve_weights("fishnet99")
    message = str(err.value)
    assert url in message and f"put the file at {hub / FILE}" in message and "Connection refused" in message
    with pytest.raises(ConnectionError, match="put the file at"):
        timm.create_model("fishnet99", pretrained=True)

    # The by-hand route: the file put at that path is used, still without any network.
    hub.mkdir(parents=True, exist_ok=True)
    (hub / FILE).write_bytes((served_dir / FILE).read_bytes())
    model = fishnet_pl.fishnet99()
    load_backbone_weights(model, "fishnet99", "fishnet99")
    torch.testing.assert_close(model.stem.conv1[0].weight, served_state(served_dir)["module.conv1.0.weight"])


def _foreign(path):
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(64, 3, 7, 7)}}, path)


def _reshaped(path):
    state = official_random_state_dict("fishnet99")
    state["module.fish.fish.9.4.1.weight"] = torch.zeros(10, 1056, 1, 1)  # a fine-tuned 10-class file
    torch.save({"state_dict": state}, path)


BAD_FILES = {
    "truncated": (lambda path, good: path.write_bytes(good[: len(good) // 3]), "not a readable PyTorch checkpoint"),
    "html page": (lambda path, good: path.write_text("<!DOCTYPE html><html>Dropbox</html>"),
                  "not a readable PyTorch checkpoint"),
    "another model": (lambda path, good: _foreign(path), "keys unknown"),
    "another shape": (lambda path, good: _reshaped(path), r"1 of another shape \['fc.weight: file \(10, 1056, 1, 1\)"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_cached_file_is_reported_moved_aside_and_downloaded_anew(kind, url, server, served_dir, hub):
    make, what = BAD_FILES[kind]
    hub.mkdir(parents=True)
    make(hub / FILE, (served_dir / FILE).read_bytes())
    with pytest.raises(ValueError, match=what) as err:
        pretrained.resolve_weights(TAG)
    assert url in str(err.value) and f"moved to {hub / FILE}.bad" in str(err.value)
    assert not (hub / FILE).exists() and (hub / f"{FILE}.bad").exists() and server.hits[f"/{FILE}"] == 0

    assert pretrained.resolve_weights(TAG) == str(hub / FILE)  # the next use downloads a good copy
    assert server.hits[f"/{FILE}"] == 1


def test_a_truncated_download_is_never_cached(server, monkeypatch, hub):
    serve_tag_from(monkeypatch, f"{server.base}/truncated/{FILE}")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint") as err:
        timm.create_model("fishnet99", pretrained=True)
    assert f"{server.base}/truncated/{FILE}?dl=1" in str(err.value) and str(hub / FILE) in str(err.value)
    assert sorted(p.name for p in hub.iterdir()) == [f"{FILE}.bad"]


def test_a_recorded_sha256_is_checked(url, server, served_dir, hub, monkeypatch):
    digest = hashlib.sha256((served_dir / FILE).read_bytes()).hexdigest()
    monkeypatch.setitem(FILE_SHA256, TAG, "0" * 64)
    with pytest.raises(ValueError, match=f"its sha256 is {digest}, the released file's is {'0' * 64}"):
        pretrained.resolve_weights(TAG)
    assert not (hub / FILE).exists() and (hub / f"{FILE}.bad").exists()

    monkeypatch.setitem(FILE_SHA256, TAG, digest.upper())  # as some tools print it
    assert pretrained.resolve_weights(TAG) == str(hub / FILE)


def test_unknown_names_and_other_variants_fail_before_any_download(url, server, hub):
    with pytest.raises(FileNotFoundError, match=r"fishnet151: no such file, and not the name of released weights "
                                                r"\(those are: fishnet99, fishnet99.in1k, fishnet150, "):
        pretrained.resolve_weights("fishnet151")
    with pytest.raises(FileNotFoundError, match="those are"):
        load_backbone_weights(fishnet_pl.fishnet_tiny(), "fishnet_tiny", "fishnet_tiny")  # no released weights
    with pytest.raises(ValueError, match="weights of fishnet99, not of fishnet_tiny"):
        load_backbone_weights(fishnet_pl.fishnet_tiny(), "fishnet_tiny", "fishnet99")
    assert not server.hits
