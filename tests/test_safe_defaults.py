"""Safe defaults (issues #8 and #20): weights never unpickled, no model code unless the caller allows
it, a remote reward needs a token and TLS off the machine and never follows a redirect, the
countdown verifier is bounded in size and time. Listeners: tests/runtime/test_loopback.py; DeepSpeed
checkpoints: tests/runtime/test_safe_load.py."""
from __future__ import annotations

import ast
import http.server
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARITH = REPO / "rlgen" / "assets" / "mdm_arith_base"
FLOW = REPO / "rlgen" / "assets" / "flow_shapes_base"

pytestmark = pytest.mark.usefixtures("one_thread")

# torch.load sites allowed to pass weights_only=False: none. (A file may be listed here only while a
# change in progress owns it; the test then keeps every other file fixed.)
PENDING_WEIGHTS_ONLY: set[str] = set()


# ----------------------------------------------------------------------------------------------
# weights: safetensors, or torch.load(weights_only=True)
# ----------------------------------------------------------------------------------------------
def _torch_load_calls():
    for folder in ("rlgen", "rewards", "rollouts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    yield path.relative_to(REPO).as_posix(), node


def test_every_torch_load_is_weights_only():
    calls = list(_torch_load_calls())
    assert calls, "the scan found no torch.load at all: is it looking in the right place?"
    unsafe = set()
    for rel, node in calls:
        kw = {k.arg: k.value for k in node.keywords}
        if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
            unsafe.add(f"{rel}:{node.lineno}")
    assert {u.split(":")[0] for u in unsafe} <= PENDING_WEIGHTS_ONLY, sorted(unsafe)


class _Boom:
    """Unpickling this writes a marker file: proof that a pickle was executed."""

    marker = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pickle code ran"))


@pytest.mark.parametrize("kind", ["masked_lm", "flow_policy"])
def test_pickled_weights_are_refused_not_executed(tmp_path, kind):
    import torch

    from rlgen.models import ModelLoadError, load_model

    marker = tmp_path / "PWNED"
    _Boom.marker = str(marker)
    if kind == "masked_lm":
        d = tmp_path / "m"
        shutil.copytree(ARITH, d)
        (d / "model.safetensors").unlink()
        torch.save({"evil": _Boom()}, d / "pytorch_model.bin")
    else:
        d = tmp_path / "f"
        shutil.copytree(FLOW, d)
        (d / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        torch.save({"evil": _Boom()}, d / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=str(d)):
        load_model(d)
    assert not marker.exists()


def test_masked_diffusion_trainer_state_loads_weights_only(tmp_path):
    # What rlgen.pretrain.masked_diffusion saves beside a checkpoint loads under weights_only=True.
    import torch

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    torch.save({"step": 3, "optimizer": opt.state_dict(), "elapsed_min": None, "model": net.state_dict()},
               tmp_path / "trainer_state.pt")
    state = torch.load(tmp_path / "trainer_state.pt", map_location="cpu", weights_only=True)
    torch.optim.AdamW(net.parameters()).load_state_dict(state["optimizer"])


# ----------------------------------------------------------------------------------------------
# listeners bind 127.0.0.1
# ----------------------------------------------------------------------------------------------
# What the embedded default's processes actually listen on is checked by listing their sockets:
# tests/runtime/test_loopback.py. Here only: an attached cluster keeps Ray's own authentication.
def test_attached_cluster_keeps_ray_authentication(monkeypatch):
    import ray

    from rlgen.runtime.cluster import RayConfig, init_ray

    seen = {}
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    assert init_ray(RayConfig(address="10.1.2.3:6379"), 1)
    assert "RAY_AUTH_MODE" not in __import__("os").environ  # not switched off for the cluster's processes
    assert "RAY_AUTH_MODE" not in seen["runtime_env"]["env_vars"] and "_node_ip_address" not in seen
    assert RayConfig().dashboard is False


def test_vllm_engine_starts_no_server():
    src = (REPO / "rollouts" / "vllm_engine.py").read_text()
    for needle in ("api_server", "uvicorn", "0.0.0.0", "serve("):
        assert needle not in src, needle


# ----------------------------------------------------------------------------------------------
# remote reward: token from the environment, no plain http off the machine
# ----------------------------------------------------------------------------------------------
class _Scorer(http.server.BaseHTTPRequestHandler):
    token = "s3cret"
    seen: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.end_headers()
            return
        _Scorer.seen.append(body)
        n = len(body["prompts"])
        reply = json.dumps({"scores": [0.5] * n}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def scorer():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Scorer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Scorer.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}/score"
    server.shutdown()
    server.server_close()


def test_remote_reward_sends_the_token_and_reads_scores(scorer, monkeypatch):
    import torch

    from rewards.base import RewardMixer

    monkeypatch.setenv("RLGEN_REWARD_TOKEN", "s3cret")
    mixer = RewardMixer({"rewards": {"remote": 1.0}, "reward_kwargs": {"remote": {"url": scorer}}})
    out = mixer(["12", "13"], ["1+11=", "1+12="])
    assert out.total.tolist() == [0.5, 0.5]
    assert _Scorer.seen[-1] == {"prompts": ["1+11=", "1+12="], "samples": ["12", "13"]}
    out = mixer(torch.zeros(2, 3, 4, 4), ["a red circle", "a blue square"])
    img = _Scorer.seen[-1]["images"]
    assert img["shape"] == [2, 3, 4, 4] and img["dtype"] == "uint8"
    assert "s3cret" not in repr(mixer.rewards["remote"].fn)


def test_remote_reward_with_a_wrong_token_is_a_reward_error(scorer, monkeypatch):
    from rewards.base import RewardError, RewardMixer

    monkeypatch.setenv("RLGEN_REWARD_TOKEN", "guess")
    mixer = RewardMixer({"rewards": {"remote": 1.0}, "reward_kwargs": {"remote": {"url": scorer}}})
    with pytest.raises(RewardError, match=r"reward 'remote' failed .*HTTP 401"):
        mixer(["12"], ["1+11="])


def test_remote_reward_needs_a_token(monkeypatch):
    from rewards.base import RewardError, resolve_reward

    monkeypatch.delenv("MY_SCORER_TOKEN", raising=False)
    with pytest.raises(RewardError, match="environment variable MY_SCORER_TOKEN is not set"):
        resolve_reward("remote", url="https://scorer.example/score", token_env="MY_SCORER_TOKEN")


@pytest.mark.parametrize("url, ok", [
    ("http://scorer.example/score", False), ("http://10.0.0.5:8000/score", False), ("ftp://127.0.0.1/x", False),
    ("https://scorer.example/score", True), ("http://127.0.0.1:9/score", True), ("http://localhost:9/s", True),
    ("http://[::1]:9/score", True),
])
def test_remote_reward_refuses_plain_http_off_the_machine(url, ok, monkeypatch):
    from rewards.base import RewardError, resolve_reward

    monkeypatch.setenv("RLGEN_REWARD_TOKEN", "t")
    if ok:
        resolve_reward("remote", url=url)  # no request is made until it is called
    else:
        with pytest.raises(RewardError, match=r"refusing plain http|must be http\(s\)"):
            resolve_reward("remote", url=url)


class _Redirector(http.server.BaseHTTPRequestHandler):
    """Answers every POST with a redirect to ``target`` (another origin, plain http)."""

    target, code = "", 302

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(self.code)
        self.send_header("Location", self.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class _Recorder(http.server.BaseHTTPRequestHandler):
    """The redirect's target: records the Authorization header of every request it gets."""

    seen: list = []

    def _record(self):
        _Recorder.seen.append(self.headers.get("Authorization"))
        reply = json.dumps({"scores": [0.5]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = _record

    def log_message(self, *args):
        pass


def _serve(handler):
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_remote_reward_never_follows_a_redirect_with_its_token(code, monkeypatch):
    from rewards.base import RewardError, RewardMixer

    recorder = _serve(_Recorder)
    _Recorder.seen = []
    # another origin (other port, and "localhost" rather than 127.0.0.1), plain http
    _Redirector.target, _Redirector.code = f"http://localhost:{recorder.server_address[1]}/steal", code
    redirector = _serve(_Redirector)
    try:
        monkeypatch.setenv("RLGEN_REWARD_TOKEN", "s3cret")
        url = f"http://127.0.0.1:{redirector.server_address[1]}/score"
        mixer = RewardMixer({"rewards": {"remote": 1.0}, "reward_kwargs": {"remote": {"url": url}}})
        with pytest.raises(RewardError, match=rf"HTTP {code} .*redirect to http://localhost:\d+/steal refused"):
            mixer(["12"], ["1+11="])
        assert _Recorder.seen == []  # the target was never contacted, so no token reached it
    finally:
        for server in (redirector, recorder):
            server.shutdown()
            server.server_close()


# ----------------------------------------------------------------------------------------------
# verifiers that evaluate model output are bounded
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, reason", [
    ("9**9**9**9", "expected a number"),                      # no exponent operator at all
    ("9" * 7 + "*2", "too long"),                            # 7-digit numbers refused
    ("(" * 9 + "1" + ")" * 9, "nested deeper"),
    ("1+" * 40 + "1", "longer than 64"),
    ("__import__('os')", "unexpected character"),           # parsed, never eval()'d
])
def test_countdown_expressions_are_size_limited(text, reason):
    from rewards.text_verifiers import ExpressionError, evaluate_countdown, verify_countdown

    with pytest.raises(ExpressionError, match=reason):
        evaluate_countdown(text)
    assert verify_countdown({"numbers": [9, 2], "target": 18}, text) == 0.0


def test_countdown_worst_case_is_fast():
    from rewards.text_verifiers import MAX_EXPR_CHARS, evaluate_countdown

    worst = "999999*" * 8 + "999999"  # about the largest value 64 characters can spell: 9 six-digit factors
    assert len(worst) <= MAX_EXPR_CHARS
    t0 = time.perf_counter()
    for _ in range(100):
        value, _ = evaluate_countdown(worst)
    assert value == 999999 ** 9
    assert time.perf_counter() - t0 < 1.0


# ----------------------------------------------------------------------------------------------
# trust_remote_code: only from the caller, never from the model folder
# ----------------------------------------------------------------------------------------------
def _remote_code_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the arith base whose config.json maps its classes to a Python file of the folder
    (auto_map) that writes a marker when imported, and whose rlgen_model.json asks for remote code."""
    d, marker = tmp_path / "downloaded", tmp_path / "PWNED"
    shutil.copytree(ARITH, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForMaskedLM": "evil_model.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil_model.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('remote code ran')\n"
                                     "raise RuntimeError('the payload ran')\n")
    meta = json.loads((d / "rlgen_model.json").read_text())
    (d / "rlgen_model.json").write_text(json.dumps({**meta, "trust_remote_code": True}))
    return d, marker


def test_masked_lm_ignores_trust_remote_code_in_the_folder(tmp_path):
    from rlgen.models.masked_lm import MaskedDiffusionLM

    d, marker = _remote_code_folder(tmp_path)
    # the folder says trust_remote_code: true; the caller did not, so transformers builds its own
    # BertForMaskedLM (config.json's model_type) and never imports evil_model.py
    model = MaskedDiffusionLM.from_pretrained(d)
    assert type(model.net).__name__ == "BertForMaskedLM"
    assert not marker.exists()


def test_evaluate_refuses_remote_code_without_the_flag(tmp_path, capsys):
    import subprocess
    import sys

    from rlgen.evaluate import main

    d, marker = _remote_code_folder(tmp_path)
    assert main(["--checkpoint", str(d), "--benchmark", "arith", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {d / 'config.json'}: ") and "--trust-remote-code" in err[0] \
        and "evil_model.py" in err[0], err
    assert not marker.exists()
    # the same folder with the flag does run its code: the payload is live, so the refusal above is real
    env = {**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    proc = subprocess.run([sys.executable, "-m", "rlgen.evaluate", "--checkpoint", str(d), "--benchmark", "arith",
                           "--no-progress", "--trust-remote-code"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and marker.read_text() == "remote code ran", proc.stderr[-2000:]
