"""models/cpu_model.py: our own model code gives the logits transformers' model gives on the same quantized
checkpoint (every architecture, prompts past a sliding window, padded batches, a cache fed in chunks, the
rotary scalings), and a warm load of a Gemma model never imports transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gguf_factory import WINDOWED, write_tiny_gguf
from inference import kv
from models import cpu_model
from models.gguf_file import read_header
from models.loader import prepare_checkpoint
from models.quant_checkpoint import load_quantized_model

ARCHS = ["llama", "qwen2", "gemma3"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, model_cache):
    """Quantized checkpoints of tiny models (gemma3 with a 32-token sliding window)."""
    folder = tmp_path_factory.mktemp("cpu-model")
    paths = {}
    for arch in ARCHS:
        path = write_tiny_gguf(folder / f"m-{arch}.gguf", arch, **WINDOWED)
        paths[arch] = prepare_checkpoint(read_header(path), model_cache, torch.float32, "quantized")
    return paths


def both(folder: Path, dtype=torch.float32):
    ours = load_quantized_model(folder, dtype, shortlist=False)
    theirs = load_quantized_model(folder, dtype, shortlist=False, own_code=False)
    assert isinstance(ours, cpu_model.CausalLM) and type(theirs).__module__.startswith("transformers.")
    return ours, theirs


def run(model, ids, **kwargs):
    with torch.inference_mode():
        return model(input_ids=ids, cache=kv.new_cache(model), use_cache=True, **kwargs).logits


def close(a, b, tolerance):
    return float((a.float() - b.float()).norm() / b.float().norm()) < tolerance


def tokens(count: int, rows: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 200, (rows, count), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompt_gives_transformers_logits(checkpoints, arch, dtype):
    ours, theirs = both(checkpoints[arch], dtype)
    ids = tokens(50)  # past gemma3's window
    assert close(run(ours, ids), run(theirs, ids), 1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_left_padded_batch_gives_transformers_logits(checkpoints, arch):
    ours, theirs = both(checkpoints[arch])
    lengths = [50, 7, 33]
    ids = tokens(50, rows=3)
    mask = torch.tensor([[0] * (50 - n) + [1] * n for n in lengths])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    got = run(ours, ids, attention_mask=mask, position_ids=positions)
    want = run(theirs, ids, attention_mask=mask, position_ids=positions)
    real = mask.bool()
    assert close(got[real], want[real], 1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_cache_fed_in_chunks_then_tokens_gives_transformers_logits(checkpoints, arch):
    ours, theirs = both(checkpoints[arch])
    ids = tokens(60)
    caches = [kv.new_cache(ours), kv.new_cache(theirs)]
    with torch.inference_mode():
        for start, end in [(0, 7), (7, 30), *((n, n + 1) for n in range(30, 60))]:
            piece, positions = ids[:, start:end], torch.arange(start, end)[None]
            got, want = (model(input_ids=piece, position_ids=positions, cache=cache, logits_to_keep=1).logits
                         for model, cache in zip((ours, theirs), caches))
            assert got.shape == want.shape and close(got, want, 1e-5), start


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16, "rope_theta": 10000.0},
])
def test_the_rotary_scalings_give_transformers_logits(checkpoints, tmp_path, rope):
    folder = tmp_path / "scaled"
    shutil.copytree(checkpoints["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = rope
    (folder / "config.json").write_text(json.dumps(config))
    ours, theirs = both(folder)
    plain = load_quantized_model(checkpoints["llama"], torch.float32, shortlist=False)
    ids = tokens(40)
    got = run(ours, ids)
    assert close(got, run(theirs, ids), 1e-5)
    assert not close(got, run(plain, ids), 1e-3)  # the scaling changed something


@pytest.mark.parametrize("arch", ARCHS)
def test_a_conversion_plans_the_same_tensors_on_our_skeleton(tmp_path, arch):
    """A first conversion takes parameter names and shapes from our module tree: the same as
    transformers' model gives, and the same GGUF tensor behind each."""
    from models import convert, gguf_arch

    header = read_header(write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, weight_types="mixed"))
    config = convert.build_config(header)
    ours, theirs = convert.model_skeleton(config), convert.model_skeleton(config, own_code=False)
    assert isinstance(ours, cpu_model.CausalLM) and not isinstance(theirs, cpu_model.CausalLM)
    shapes = [{name: tuple(t.shape) for name, t in model.state_dict().items()} for model in (ours, theirs)]
    assert shapes[0] == shapes[1]
    assert gguf_arch.name_map(arch, shapes[0]) == gguf_arch.name_map(arch, shapes[1])


@pytest.mark.parametrize("change", [{"model_type": "mistral"}, {"attn_logit_softcapping": 50.0},
                                    {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
                                    {"hidden_act": "relu"},
                                    {"rope_parameters": None, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}])
def test_what_it_does_not_cover_goes_to_transformers(checkpoints, tmp_path, change):
    config = cpu_model.ModelConfig({**json.loads((checkpoints["llama"] / "config.json").read_text()), **change})
    assert cpu_model.unsupported(config) and cpu_model.build_model(config) is None
    if "model_type" not in change:  # the same checkpoint then loads through transformers' class
        folder = tmp_path / "other"
        shutil.copytree(checkpoints["llama"], folder)
        (folder / "config.json").write_text(json.dumps(config.__dict__))
        model = load_quantized_model(folder, torch.float32)
        assert type(model).__module__.startswith("transformers.")


def test_a_warm_gemma_load_and_reply_never_import_transformers(tiny_models, model_cache):
    """The reason this module exists: a fresh process serves a converted Gemma model with torch alone."""
    from models.loader import LoadOptions, load_model

    load_model(tiny_models["gemma3"], model_cache, LoadOptions(kernels="torch"))  # converted here, once
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from inference.generate import stream_generate
        from inference.params import GenerationParams
        from models.loader import LoadOptions, import_model_code, load_model
        import_model_code(LoadOptions())
        lm = load_model(Path({str(tiny_models["gemma3"])!r}), Path({str(model_cache)!r}), LoadOptions(kernels="torch"))
        prompt = lm.render_chat([{{"role": "user", "content": "Hi"}}])
        chunks = list(stream_generate(lm, prompt, GenerationParams(max_tokens=4, temperature=0)))
        print(type(lm.model).__module__, len(chunks) > 0, sorted(m for m in sys.modules if m.startswith("transformers")))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[0] == "models.cpu_model True []", out.stdout
