"""VLLMEngine against transformers on the same tiny Llama: sampled-token log-probs, teacher scoring,
next-token top-k, live weight updates, errors, and the Ray actor."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rollouts.testing import build_tiny_llama
from rollouts.vllm_engine import Completion, VLLMEngine, vllm_engine_actor

TOL = 1e-4  # float32 on both sides; vLLM's CPU kernels differ from torch's in summation order only


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llama")
    return build_tiny_llama(root / "a", seed=0), build_tiny_llama(root / "b", seed=1)


@pytest.fixture(scope="module")
def engine(model_dirs):
    eng = VLLMEngine(model_dirs[0], seed=0)
    yield eng
    eng.shutdown()


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf(model_dirs):
    return hf_model(model_dirs[0])


@torch.no_grad()
def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), V): log p(next token | ids[:t+1])."""
    return model(torch.tensor([ids])).logits[0].log_softmax(-1)


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def assert_completion_logprobs(model, c: Completion, top_k: int):
    lp = hf_logprobs(model, c.prompt_token_ids + c.token_ids)
    P = len(c.prompt_token_ids)
    ref = torch.stack([lp[P - 1 + t, tok] for t, tok in enumerate(c.token_ids)])
    assert torch.allclose(torch.tensor(c.logprobs), ref, atol=TOL), (c.logprobs, ref.tolist())
    for t, top in enumerate(c.top_logprobs or []):
        vals, idx = lp[P - 1 + t].topk(top_k)
        assert set(top) == set(idx.tolist())
        assert np.allclose([top[i] for i in idx.tolist()], vals.numpy(), atol=TOL)


def test_generate_logprobs_match_transformers(engine, hf):
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    out = engine.generate(prompts, max_tokens=6, temperature=1.0, n=2, seed=3, logprobs=2, ignore_eos=True)
    assert [c.prompt_index for c in out] == [0, 0, 1, 1]
    assert [c.prompt_token_ids for c in out] == [prompts[0]] * 2 + [prompts[1]] * 2
    for c in out:
        assert len(c.token_ids) == len(c.logprobs) == 6 and c.finish_reason == "length"
        assert_completion_logprobs(hf, c, top_k=2)
    # text prompts are tokenized by the engine's tokenizer; the returned text decodes the tokens
    (c,) = engine.generate(["the red circle is"], max_tokens=5, temperature=0.0, logprobs=0, ignore_eos=True)
    assert c.prompt_token_ids == engine.tokenizer.encode("the red circle is")
    assert c.token_ids == hf_greedy(hf, c.prompt_token_ids, 5)
    # vLLM drops special tokens and holds back an unfinished UTF-8 byte sequence at the end
    assert engine.tokenizer.decode(c.token_ids, skip_special_tokens=True).startswith(c.text)
    assert c.top_logprobs is None
    assert_completion_logprobs(hf, c, top_k=0)


def test_generate_seeded_is_reproducible(engine):
    kw = dict(max_tokens=8, temperature=1.0, n=3, seed=11, ignore_eos=True)
    a = [c.token_ids for c in engine.generate([[5, 6, 7]], **kw)]
    b = [c.token_ids for c in engine.generate([[5, 6, 7]], **kw)]
    assert a == b
    assert len({tuple(t) for t in a}) == 3  # the n samples of one prompt differ
    assert engine.generate([[5, 6, 7]], max_tokens=4)[0].logprobs is None
    assert engine.generate([]) == [] and engine.score([], []) == []
    with pytest.raises(ValueError, match="max_logprobs"):
        engine.generate([[5]], logprobs=engine.max_logprobs + 1)


def test_score_matches_transformers(engine, hf):
    prompts = [[5, 6, 7], [40, 41], [3]]
    completions = [[8, 9, 10, 11], [100, 7, 300, 2, 17, 18], []]
    got = engine.score(prompts, completions)
    assert [len(g) for g in got] == [4, 6, 0]
    for p, c, g in zip(prompts, completions, got[:2]):
        lp = hf_logprobs(hf, p + c)
        ref = [lp[len(p) - 1 + t, tok].item() for t, tok in enumerate(c)]
        assert np.allclose(g, ref, atol=TOL), (g, ref)
    with pytest.raises(ValueError, match="at least one token"):
        engine.score([[]], [[1]])


def test_next_token_logprobs_match_transformers(engine, hf):
    prompts = [[5, 6, 7], [50, 60]]
    got = engine.next_token_logprobs(prompts, top_k=5)
    for p, g in zip(prompts, got):
        vals, idx = hf_logprobs(hf, p)[-1].topk(5)
        assert list(g) == idx.tolist()  # ordered by rank
        assert np.allclose(list(g.values()), vals.numpy(), atol=TOL)


def test_update_weights_visible_in_next_generation(engine, model_dirs, hf):
    # Longer than a KV block (128 tokens on CPU, 16 on GPU): its first blocks then sit in the prefix
    # cache, which must be dropped on update, or the next request reuses KV from the old weights.
    long_prompt = [3 + i % 300 for i in range(300)]
    before = engine.generate([long_prompt], max_tokens=6, temperature=0.0, ignore_eos=True)[0].token_ids
    original = load_file(str(model_dirs[0] / "model.safetensors"))
    try:
        # 1) another model's weights, as numpy arrays (what arrives from Ray's object store)
        new = {k: v.numpy() for k, v in load_file(str(model_dirs[1] / "model.safetensors")).items()}
        engine.update_weights(new, version=1)
        assert engine.weights_version == 1
        hf_new = hf_model(model_dirs[1])
        after = engine.generate([long_prompt], max_tokens=6, temperature=0.0, ignore_eos=True)[0].token_ids
        assert after == hf_greedy(hf_new, long_prompt, 6) != before
        (got,) = engine.score([long_prompt], [after])
        lp = hf_logprobs(hf_new, long_prompt + after)
        assert np.allclose(got, [lp[len(long_prompt) - 1 + t, tok].item() for t, tok in enumerate(after)], atol=TOL)
        # 2) a partial update making one token dominate: silence every block's output (the hidden
        # state is then the token's embedding), make embedding dim 0 positive, read only dim 0.
        target = 123
        sd = {k: v.clone() for k, v in original.items()}
        for k in sd:
            if k.endswith(("o_proj.weight", "down_proj.weight")):
                sd[k].zero_()
        sd["model.embed_tokens.weight"][:, 0] = 1.0
        sd["lm_head.weight"].zero_()
        sd["lm_head.weight"][target, 0] = 10.0
        engine.update_weights(sd, version=2)
        out = engine.generate([long_prompt, [5]], max_tokens=4, temperature=0.0, ignore_eos=True)
        assert [c.token_ids for c in out] == [[target] * 4] * 2
    finally:
        engine.update_weights(original, version=3)
    assert engine.generate([long_prompt], max_tokens=6, temperature=0.0, ignore_eos=True)[0].token_ids == before
    assert engine.weights_version == 3


def test_update_weights_rejects_unknown_names_and_shapes(engine):
    w = engine.generate([[5, 6]], max_tokens=3, temperature=0.0, ignore_eos=True)[0].token_ids
    with pytest.raises(ValueError, match="not a parameter"):
        engine.update_weights({"model.layers.0.self_attn.qkv.weight": torch.zeros(3)}, version=9)
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights({"lm_head.weight": torch.zeros(3, 3)}, version=9)
    with pytest.raises(ValueError, match="empty"):
        engine.update_weights({}, version=9)
    assert engine.weights_version != 9
    assert engine.generate([[5, 6]], max_tokens=3, temperature=0.0, ignore_eos=True)[0].token_ids == w


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist or has no config.json"):
        VLLMEngine(tmp_path / "nope")


def test_second_engine_in_process_and_its_shutdown(engine, model_dirs):
    expect = engine.generate([[5, 6, 7]], max_tokens=4, temperature=0.0, ignore_eos=True)[0].token_ids
    threads, rng, set_threads = torch.get_num_threads(), torch.random.get_rng_state(), torch.set_num_threads
    other = VLLMEngine(model_dirs[1])
    # starting vLLM in-process seeds the global RNGs and pins torch to 1 thread: all put back
    assert torch.get_num_threads() == threads and torch.set_num_threads is set_threads
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert other.generate([[5, 6, 7]], max_tokens=4, temperature=0.0, ignore_eos=True)[0].token_ids != expect
    other.shutdown()
    other.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        other.generate([[5]])
    # vLLM's shutdown destroyed the process-global distributed groups; the survivor still works
    assert engine.generate([[5, 6, 7]], max_tokens=4, temperature=0.0, ignore_eos=True)[0].token_ids == expect


def test_engine_as_ray_actor(model_dirs, hf):
    import shutil
    import tempfile

    import ray

    tmp = tempfile.mkdtemp(prefix="rlgen_ray_", dir="/tmp")  # short: Ray's socket paths are length-limited
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    try:
        actor = vllm_engine_actor(model_dirs[0], num_cpus=1)
        (c,) = ray.get(actor.generate.remote([[5, 6, 7]], max_tokens=4, temperature=0.0, logprobs=0,
                                             ignore_eos=True), timeout=300)
        assert c.token_ids == hf_greedy(hf, [5, 6, 7], 4)
        assert_completion_logprobs(hf, c, top_k=0)
        new = {k: v.numpy() for k, v in load_file(str(model_dirs[1] / "model.safetensors")).items()}
        ray.get(actor.update_weights.remote(ray.put(new), 1), timeout=120)
        assert ray.get(actor.score.remote([[5, 6, 7]], [c.token_ids])) != [c.logprobs]
        ray.get(actor.shutdown.remote())
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
