"""Train an EAGLE-3 head for a target by self-distillation (`lightspeed train-eagle3`).

1. Data: the target answers the prompts greedily through lightspeed's LLM; the sequences
   (prompt + answer token ids) are saved to OUT/data.jsonl and reused on --resume.
2. Draft vocabulary: the N most frequent target tokens of the generated answers (then of the
   prompts, then the lowest ids), sorted; d2t[i] = id_i - i, t2d marks them.
3. Target features (lightspeed/train/features.py): sequences packed into batched target
   forwards; the aux hidden states, the final hidden state and the greedy token, cached on the
   device up to --feature-cache-gb (first epoch on the fly, later epochs from the cache).
4. Training-time test (TTT), K = --ttt-steps, tokens t_0..t_{L-1}, target logits z_i (predict t_{i+1}):

       step 0, row i: hidden fc(aux_i), token t_{i+1}, position i      -> predicts t_{i+2} (z_{i+1})
       step k, row i: hidden = the head's own pre-norm output of step k-1 row i,
                      token t_{i+1+k}, position i+k                    -> predicts t_{i+2+k} (z_{i+1+k})

   Attention as at test time (lightspeed/speculative/eagle3.py): row i of step k sees the step-0 keys
   of rows 0..i (the target-state KV) and its own keys of steps 1..k (its chain's scratch KV).
   Loss of step k: soft cross-entropy between the target distribution restricted to the draft
   vocabulary and the head's, on rows whose target argmax is in the draft vocabulary; total
   = sum_k 0.8^k loss_k. A step trains --batch-size sequences, right-padded into one batched
   unroll (bf16 autocast on CUDA, float32 master weights); --time-budget stops it cleanly.
5. Output: OUT/config.json + OUT/model.safetensors in the published EAGLE-3 format
   (`--speculative eagle3:OUT`), OUT/checkpoint.pt (head + AdamW + step + RNG: --resume
   continues exactly), OUT/train_log.json (loss curve; held-out loss and per-step accuracy,
   over all rows and over the answer rows that compare with greedy acceptance: see ttt_loss).
"""
from __future__ import annotations

import inspect
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lightspeed.errors import InvalidRequestError, UnsupportedModelError
from lightspeed.models.eagle3 import default_aux_layer_ids
from lightspeed.train.features import FeatureStore
from lightspeed.train.head import build_head, head_hf_config, save_head, trainable, ttt_forward, ttt_loss

@dataclass
class TrainConfig:
    target: str
    prompts: str
    out: str
    draft_vocab_size: int = 32000
    aux_layers: list[int] | None = None
    ttt_steps: int = 7
    max_tokens: int = 256  # answer length of the target per prompt
    max_len: int = 2048  # sequences (prompt + answer) are cut to this many tokens
    steps: int = 2000
    batch_size: int = 1  # sequences per optimizer step, in one padded batch
    time_budget: float | None = None  # seconds from the start (data generation included); then save and stop
    gen_batch: int = 64  # concurrent requests while the target generates the data
    feature_cache_gb: float | None = None  # None: 40% of free GPU memory, 2 GiB on CPU
    lr: float = 3e-4
    warmup: int = 50
    seed: int = 0
    resume: bool = False
    checkpoint_every: int = 200
    holdout: float = 0.1  # fraction of sequences held out for evaluation
    max_prompts: int | None = None
    device: str | None = None
    dtype: str | None = None
    progress: bool = True


# ---------------------------------------------------------------------------------- target


def check_target_arch(target: str) -> None:
    """Clear error for a target whose architecture cannot capture hidden states."""
    from lightspeed.loader import resolve_model
    path = resolve_model(target) if not target.startswith("shape:") else None
    if path is None or not (path / "config.json").is_file():
        return
    archs = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    import importlib

    from lightspeed.models import _MODELS

    def captures(arch: str) -> bool:
        mod, cls = _MODELS[arch]
        return "aux_layer_ids" in inspect.signature(getattr(importlib.import_module(mod), cls).forward).parameters
    supported = [a for a in _MODELS if captures(a)]
    if not any(a in supported for a in archs):
        raise UnsupportedModelError(
            f"target {target}: architecture {archs} cannot capture the hidden states an EAGLE-3 head is trained on "
            f"(train-eagle3 supports {', '.join(supported)})")


def check_capture(model) -> None:
    if "aux_layer_ids" not in inspect.signature(model.forward).parameters:
        raise UnsupportedModelError(f"{type(model).__name__} cannot return aux-layer hidden states; EAGLE-3 heads "
                                    "can only be trained for targets with hidden-state capture")


def resolve_aux_layers(aux: list[int] | None, num_layers: int) -> list[int]:
    aux = list(aux) if aux else default_aux_layer_ids(num_layers)
    if len(aux) != 3:
        raise InvalidRequestError(f"--aux-layers needs 3 layer ids, got {aux}")
    bad = [i for i in aux if not 0 <= i < num_layers]
    if bad:
        raise InvalidRequestError(f"--aux-layers {aux}: {bad} out of range for the {num_layers}-layer target "
                                  f"(valid: 0 .. {num_layers - 1})")
    return aux


# ---------------------------------------------------------------------------------- data


def generate_data(llm, prompts, max_tokens: int, max_len: int) -> list[dict]:
    """Greedy self-distillation: prompt + the target's own answer, as token ids."""
    from lightspeed.config import SamplingParams
    toks = []
    limit = min(max_len, llm.engine.max_model_len)  # NOTE: a prompt must leave room for an answer
    for p in prompts:
        try:
            ids = llm.apply_chat_template(p) if isinstance(p, list) else llm.engine.tokenize_prompt(p)
        except InvalidRequestError:
            continue
        if 2 <= len(ids) < limit:
            toks.append(ids)
    if not toks:
        raise InvalidRequestError("no usable prompt in the prompt source (all empty or too long)")
    outs = llm.generate(toks, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return [{"ids": (p + list(o.token_ids))[:max_len], "prompt_len": len(p)} for p, o in zip(toks, outs)]


def choose_draft_vocab(seqs: list[list[int]], prompt_lens: list[int], n: int, vocab: int) -> torch.Tensor:
    """The n most frequent target tokens of the answers (ties: lower id), then of the prompts,
    then the lowest unused ids; sorted [n] int64."""
    from collections import Counter
    n = min(n, vocab)
    ans, pro = Counter(), Counter()
    for s, pl in zip(seqs, prompt_lens):
        ans.update(s[pl:])
        pro.update(s[:pl])
    chosen: list[int] = []
    seen: set[int] = set()
    for counter in (ans, pro):
        for tok, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])):
            if len(chosen) >= n:
                break
            if tok not in seen and 0 <= tok < vocab:
                chosen.append(tok)
                seen.add(tok)
    t = 0
    while len(chosen) < n:
        if t not in seen:
            chosen.append(t)
            seen.add(t)
        t += 1
    return torch.tensor(sorted(chosen), dtype=torch.long)


# ---------------------------------------------------------------------------------- head


class Trainer:
    def __init__(self, cfg: TrainConfig, llm=None):
        self.cfg = cfg
        out = Path(cfg.out).expanduser()
        self.out = out
        if cfg.ttt_steps < 1:
            raise InvalidRequestError("--ttt-steps must be >= 1")
        if cfg.draft_vocab_size < 1:
            raise InvalidRequestError("--draft-vocab-size must be >= 1")
        if cfg.time_budget is not None and cfg.time_budget <= 0:
            raise InvalidRequestError("--time-budget must be a positive number of seconds")
        if cfg.batch_size < 1:
            raise InvalidRequestError("--batch-size must be >= 1")
        self.t_start = time.time()
        self.data_seconds, self.speed, self._t_train = 0.0, {}, None
        check_target_arch(cfg.target)
        data_file = out / "data.jsonl"
        resuming = cfg.resume and (out / "checkpoint.pt").is_file() and data_file.is_file()
        prompts = None
        if not resuming:
            from lightspeed.train.data import load_prompts
            prompts = load_prompts(cfg.prompts)  # before loading the model: fail fast
            if cfg.max_prompts:
                prompts = prompts[: cfg.max_prompts]
        if llm is None:
            from lightspeed.engine.llm import LLM
            # NOTE: a bounded KV cache: the rest of the GPU holds the feature cache and the training
            on_gpu = torch.cuda.is_available() and (cfg.device or "cuda").startswith("cuda")
            llm = LLM(cfg.target, device=cfg.device, dtype=cfg.dtype, max_num_seqs=cfg.gen_batch,
                      kv_cache_gb=8.0 if on_gpu else None)
        self.llm = llm
        self.model = llm.engine.runner.model
        check_capture(self.model)
        self.mc = self.model.config
        self.aux_layers = resolve_aux_layers(cfg.aux_layers, self.mc.num_hidden_layers)
        if resuming:
            recs = [json.loads(line) for line in data_file.read_text().splitlines() if line.strip()]
        else:
            t = time.time()
            recs = generate_data(llm, prompts, cfg.max_tokens, cfg.max_len)
            num = sum(len(r["ids"]) - r["prompt_len"] for r in recs)
            self.data_seconds = time.time() - t
            print(f"data: {len(recs)} sequences, {num} generated tokens in {self.data_seconds:.1f} s "
                  f"({num / max(self.data_seconds, 1e-9):.0f} tok/s)", file=sys.stderr)
            out.mkdir(parents=True, exist_ok=True)
            with open(data_file, "w") as f:
                for r in recs:
                    f.write(json.dumps(r) + "\n")
        recs = [r for r in recs if len(r["ids"]) >= 3]
        self.seqs = [r["ids"] for r in recs]
        self.prompt_lens = [r.get("prompt_len", 0) for r in recs]
        if not self.seqs:
            raise InvalidRequestError("the generated data holds no sequence of 3 or more tokens")
        n_hold = max(1, int(len(self.seqs) * cfg.holdout)) if len(self.seqs) > 1 else 0
        self.heldout = list(range(n_hold))
        self.train = list(range(n_hold, len(self.seqs))) or self.heldout
        device = self.model.lm_head.weight.device
        self.device = device
        self.draft_ids = choose_draft_vocab(self.seqs, self.prompt_lens, cfg.draft_vocab_size,
                                            self.mc.vocab_size).to(device)
        self.t2d = torch.zeros(self.mc.vocab_size, dtype=torch.bool, device=device)
        self.t2d[self.draft_ids] = True
        self.hf_cfg = head_hf_config(self.mc, len(self.draft_ids), self.aux_layers)
        self.head = build_head(self.hf_cfg, self.model, self.draft_ids, cfg.seed)
        self.params = [p for _, p in trainable(self.head)]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.step = 0
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.log = {"losses": [], "accuracy": [], "eval": []}
        gb = cfg.feature_cache_gb
        if gb is None:
            gb = 0.4 * torch.cuda.mem_get_info(device)[0] / 2**30 if device.type == "cuda" else 2.0
        self.features = FeatureStore(self.model, self.seqs, self.aux_layers, self.draft_ids, int(gb * 2**30))
        self.amp = device.type == "cuda"  # bf16 autocast; the head's weights stay float32
        if resuming:
            self.load_checkpoint()

    # loss ---------------------------------------------------------------------------
    def batch_loss(self, idx: list[int]):
        """Sequences by index -> (loss, per-step losses [K], per-step (correct, count) over all
        rows and answer rows [K, 2, 2] (ttt_loss), tokens)."""
        ids, lens, aux, tgt_draft, tgt_argmax = self.features.batch(idx)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            step_logits = ttt_forward(self.head, ids, aux, self.cfg.ttt_steps, lens)
        prompt_lens = torch.tensor([self.prompt_lens[i] for i in idx])
        total, losses, accs = ttt_loss(step_logits, tgt_draft, tgt_argmax, lens, self.draft_ids, self.t2d, prompt_lens)
        return total, losses, accs, int(lens.sum())

    @torch.no_grad()
    def evaluate(self, idx: list[int] | None = None) -> dict:
        idx = self.heldout if idx is None else idx
        bs = self.cfg.batch_size
        loss, accs = 0.0, torch.zeros(self.cfg.ttt_steps, 2, 2, dtype=torch.long)
        for i in range(0, len(idx), bs):
            total, _, a, _ = self.batch_loss(idx[i:i + bs])
            loss += float(total) * len(idx[i:i + bs])
            accs += a.cpu()
        acc, answer = ([c / max(n, 1) for c, n in a] for a in accs.transpose(0, 1).tolist())
        return {"step": self.step, "loss": loss / max(len(idx), 1), "accuracy": acc, "answer_accuracy": answer}

    # checkpoint ---------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        state = {"head": {n: p.detach().cpu() for n, p in trainable(self.head)}, "opt": self.opt.state_dict(),
                 "step": self.step, "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                 "py_rng": random.getstate(), "draft_ids": self.draft_ids.cpu(), "log": self.log,
                 "config": asdict(self.cfg)}
        tmp = self.out / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.out / "checkpoint.pt")

    def load_checkpoint(self) -> None:
        state = torch.load(self.out / "checkpoint.pt", map_location="cpu", weights_only=False)
        if not torch.equal(state["draft_ids"], self.draft_ids.cpu()):
            raise InvalidRequestError(f"{self.out}/checkpoint.pt was trained with another draft vocabulary; "
                                      "resume with the same --draft-vocab-size")
        with torch.no_grad():
            for n, p in trainable(self.head):
                p.copy_(state["head"][n])
        self.opt.load_state_dict(state["opt"])
        self.step = state["step"]
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["py_rng"])
        self.log = state["log"]

    # loop ---------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine to 10% over --steps (or the time budget when that ends first)."""
        c = self.cfg
        if step < c.warmup:
            return c.lr * (step + 1) / c.warmup
        frac = (step - c.warmup) / max(1, c.steps - c.warmup)
        if c.time_budget and self._t_train is not None:
            left = c.time_budget - (self._t_train - self.t_start)
            frac = max(frac, (time.time() - self._t_train) / max(left, 1e-9))
        return c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    def out_of_time(self) -> bool:
        return self.cfg.time_budget is not None and time.time() - self.t_start >= self.cfg.time_budget

    def train_steps(self, until: int | None = None) -> list[float]:
        c = self.cfg
        until = c.steps if until is None else min(until, c.steps)
        if not self.log["eval"] and self.heldout:
            self.log["eval"].append(self.evaluate())
        self._t_train = t0 = time.time()
        last, first_step, tokens = 0.0, self.step, 0
        while self.step < until and not self.out_of_time():
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.step)
            self.opt.zero_grad(set_to_none=True)
            idx = [self.train[i] for i in torch.randint(len(self.train), (c.batch_size,), generator=self.gen).tolist()]
            total, _, accs, num = self.batch_loss(idx)
            total.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.step += 1
            tokens += num
            loss = float(total.detach())  # NOTE: the one host sync of a step
            acc = [a / max(n, 1) for a, n in accs[:, 0].tolist()]
            self.log["losses"].append(loss)
            self.log["accuracy"].append(acc)
            if c.progress and (time.time() - last > 0.5 or self.step == until):
                last = time.time()
                done = self.step / c.steps
                if c.time_budget:
                    done = max(done, (last - self.t_start) / c.time_budget)
                _progress(done, self.step, loss, acc, last - t0, self.step - first_step, tokens)
            if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.step < c.steps:
                self.save_checkpoint()
        seconds, steps = time.time() - t0, self.step - first_step
        self.speed = {"train_seconds": seconds, "train_steps": steps, "train_tokens": tokens,
                      "ms_per_step": 1000 * seconds / max(steps, 1), "train_tokens_per_s": tokens / max(seconds, 1e-9)}
        if c.progress:
            sys.stderr.write("\n")
            print(f"trained {steps} steps ({c.batch_size} sequences each) in {seconds:.1f} s: "
                  f"{self.speed['ms_per_step']:.1f} ms/step, {self.speed['train_tokens_per_s']:.0f} tokens/s"
                  + (" (time budget reached)" if self.out_of_time() else ""), file=sys.stderr)
        return self.log["losses"]

    def finish(self) -> Path:
        if self.heldout:
            self.log["eval"].append(self.evaluate())
        self.save_checkpoint()
        save_head(self.head, self.hf_cfg, self.out)
        (self.out / "train_log.json").write_text(json.dumps(
            {"config": asdict(self.cfg), "aux_layers": self.aux_layers,
             "draft_vocab_size": len(self.draft_ids), "num_sequences": len(self.seqs),
             "num_heldout": len(self.heldout), "data_seconds": self.data_seconds, **self.speed,
             "command": " ".join(sys.argv), **self.log}))
        return self.out


def _progress(done: float, step: int, loss: float, acc: list[float], elapsed: float, steps: int,
              tokens: int) -> None:
    """One line, redrawn: done (fraction of --steps or of the time budget), loss, per-TTT-step accuracy, speed."""
    width = 24
    bar = int(width * min(done, 1.0))
    accs = " ".join(f"{a:.2f}" for a in acc[:8])
    sys.stderr.write(f"\r[{'#' * bar}{'.' * (width - bar)}] step {step} loss {loss:.4f} acc/step {accs} {elapsed:.0f}s "
                     f"{1000 * elapsed / max(steps, 1):.0f} ms/step {tokens / max(elapsed, 1e-9):.0f} tok/s")
    sys.stderr.flush()


def train_eagle3(cfg: TrainConfig, llm=None) -> Path:
    trainer = Trainer(cfg, llm)
    trainer.train_steps()
    return trainer.finish()
