"""Real weights: SmolLM2-135M-Instruct from its Q4_1 GGUF, greedy tokens identical to HF
transformers loading the same GGUF."""
import pytest
import torch

from lightspeed import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three primary colors:",
]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    return model.eval(), tok


def test_smollm2_gguf_greedy_matches_transformers(smollm2_path, hf_smollm2):
    model, tok = hf_smollm2
    llm = LLM(str(smollm2_path), device="cpu", dtype="float32")
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    outs = llm.generate(prompt_ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    for ids, out in zip(prompt_ids, outs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(ids):].tolist()
        assert out.token_ids == ref
    # the chat path: the GGUF's template and tokenizer agree with HF's
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    ref_ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ref_ids = ref_ids["input_ids"] if isinstance(ref_ids, dict) or hasattr(ref_ids, "keys") else ref_ids
    assert llm.apply_chat_template(msgs) == list(ref_ids)
    reply = llm.chat(msgs, SamplingParams(max_tokens=24, temperature=0.0))
    assert reply.text.strip() and reply.finished


@pytest.mark.gpu
@pytest.mark.slow
def test_qwen_coder_1_5b_gguf_greedy_matches_transformers_on_gpu():
    """Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF) on the GPU in fp32: identical greedy tokens."""
    transformers = pytest.importorskip("transformers")
    from lightspeed.loader.pull import CATALOG, _is_cached, model_path
    name = "qwen2.5-coder-1.5b-instruct"
    path = model_path(name)
    if not _is_cached(CATALOG[name], path):
        pytest.skip(f"{name} is not in the lightspeed cache (lightspeed pull {name})")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).cuda().eval()
    llm = LLM(str(path), device="cuda", dtype="float32", max_model_len=1024)
    prompts = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
               "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n",
               "# Write a function that reverses a string\n", "import numpy as np\n\ndef softmax(x):\n"]
    prompt_ids = [llm.tokenizer.encode(p) for p in prompts]
    outs = llm.generate(prompt_ids, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    for ids, out in zip(prompt_ids, outs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=64, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert out.token_ids == ref
