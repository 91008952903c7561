"""A reward computed by a remote HTTP endpoint (a scoring service another team runs).

    rewards: {remote: 1.0}
    reward_kwargs: {remote: {url: "https://scorer.internal/score", token_env: RLGEN_REWARD_TOKEN}}

Each call POSTs one JSON batch and expects ``{"scores": [float | null, ...]}`` back, one per sample:

    {"prompts": [...], "samples": [...texts...]}                      text samples
    {"prompts": [...], "images": {"shape": [B, 3, H, W], "dtype": "uint8", "data": "<base64>"}}

Safe by default: the bearer token comes from an environment variable (never from a config file that
gets copied into run folders) and a missing or empty one is an error; plain ``http://`` is refused
for any host but the loopback, so the token and samples only leave the machine over TLS. Redirects
are not followed (urllib would resend the token to whatever the Location names, http included):
a redirecting endpoint is an error naming where it pointed. Scores are checked like every
reward's (count, NaN) by ``rewards.base``.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import os
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import numpy as np
import torch

from rlgen.registry import register_reward

LOOPBACK_NAMES = {"localhost"}
MAX_RESPONSE_BYTES = 16 << 20  # a score list is small; a huge reply is a misconfigured endpoint


def _is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(url: str) -> str:
    """The url, if it is https, or http to the loopback; ValueError naming it otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"remote reward: url {url!r} must be http(s)://host[:port]/path")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError(f"remote reward: refusing plain http to {parts.hostname!r} ({url}); use https "
                         f"(plain http is allowed only to 127.0.0.1 / localhost)")
    return url


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Every 3xx is an error: the Authorization header must never reach another origin or plain http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"{msg}: redirect to {newurl} refused (the token is not "
                                     f"forwarded; configure the final url)", headers, fp)


_OPENER = urllib.request.build_opener(_RefuseRedirects)


def _encode_samples(samples) -> dict:
    if isinstance(samples, (torch.Tensor, np.ndarray)):
        x = torch.as_tensor(np.asarray(samples) if isinstance(samples, np.ndarray) else samples).detach().cpu()
        if x.dtype != torch.uint8:  # images in [-1, 1] → uint8, the compact form a scorer expects
            x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return {"images": {"shape": list(x.shape), "dtype": "uint8",
                           "data": base64.b64encode(x.contiguous().numpy().tobytes()).decode()}}
    return {"samples": [str(s) for s in samples]}


@register_reward("remote")
class RemoteReward:
    """``url``: the endpoint; ``token_env``: the environment variable holding the bearer token."""

    def __init__(self, url: str, token_env: str = "RLGEN_REWARD_TOKEN", timeout_s: float = 60.0):
        self.url = check_endpoint(url)
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise ValueError(f"remote reward: environment variable {token_env} is not set; the endpoint "
                             f"{url} needs a bearer token (export {token_env}=...)")
        self._token, self.timeout_s = token, float(timeout_s)

    def __call__(self, samples, prompts, **meta) -> list[float | None]:
        body = json.dumps({"prompts": list(prompts), **_encode_samples(samples)}).encode()
        req = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self._token}"})
        try:
            with _OPENER.open(req, timeout=self.timeout_s) as resp:
                raw = resp.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"remote reward {self.url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise RuntimeError(f"remote reward {self.url}: {e}") from None
        if len(raw) > MAX_RESPONSE_BYTES:
            raise RuntimeError(f"remote reward {self.url}: reply larger than {MAX_RESPONSE_BYTES} bytes")
        try:
            scores = json.loads(raw)["scores"]
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"remote reward {self.url}: reply is not JSON with a 'scores' list: "
                               f"{raw[:200]!r}") from None
        if not isinstance(scores, list):
            raise RuntimeError(f"remote reward {self.url}: 'scores' must be a list, got {type(scores).__name__}")
        return scores

    def __repr__(self) -> str:  # never show the token
        return f"RemoteReward(url={self.url!r})"
