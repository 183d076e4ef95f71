"""``hf:NAME_OR_PATH``: a Hugging Face sequence-classification reward model as a member.

Each response is scored in its conversation: the prompt messages plus the response,
rendered with the tokenizer's chat template (the format the reward model was trained on);
a tokenizer without one falls back to a plain ``User: ... / Assistant: ...`` transcript,
and the stage says so. The reward is the single output logit, or the positive class's
logit for a two-label head.

- bf16 on CUDA, fp32 on CPU.
- Length bucketing: within a window of rows, texts are sorted by token count before
  batching, so a batch pads to near its own length rather than the window's longest.
- Truncation is counted, never silent: a text longer than ``max_length`` tokens loses its
  *start* (``truncation_side="left"``): the end is the response being judged, and cutting
  the end could leave the two responses of a pair with identical visible text. The count
  goes to the manifest and a progress note.
- ``max_length`` is capped at what the model can take: the tokenizer's ``model_max_length``
  (unless it is transformers' "no limit" sentinel) and the config's ``max_position_embeddings``
  less the positions the architecture reserves (RoBERTa-style models number positions from
  ``padding_idx + 1``, so 514 embeddings hold 512 tokens). A cap below ``--max-length`` is
  noted once and recorded in the manifest; texts are then truncated to the cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from prefcurate.backends.reward import MemberOptions, MemberScores
from prefcurate.errors import ConfigError, InputError, MissingDependency, StageFailed
from prefcurate.schema import render_transcript
from prefcurate.stages.base import ProgressTask, StageContext, StageInput

WINDOW_ROWS = 1024  # rows per bucketing window (2 texts each)
COLUMNS = ("prompt", "chosen", "rejected")
NO_LIMIT = 10**12  # a tokenizer's model_max_length at or above this is "unset" (transformers writes 1e30)


def model_limits(tokenizer: Any, model: Any) -> dict[str, int]:
    """The most tokens the model takes, keyed by where each limit comes from: only a model with
    an absolute position table has a hard limit (past it, a crash), its config's
    ``max_position_embeddings`` less the positions the architecture reserves before the first
    token (the RoBERTa family keeps ``padding_idx + 1`` slots for padding), and then also the
    tokenizer's ``model_max_length`` when set to a real value. A model with relative or rotary
    positions (DeBERTa-v3, Llama) runs past what its tokenizer declares, so ``--max-length``
    stays the user's choice there.
    """
    reserved = _reserved_positions(model)
    if reserved is None:
        return {}
    limits: dict[str, int] = {}
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < NO_LIMIT:
        limits[f"the tokenizer's model_max_length {tok_max}"] = tok_max
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions - reserved > 0:
        less = f" less {reserved} reserved" if reserved else ""
        limits[f"the model's max_position_embeddings {positions}{less}"] = positions - reserved
    return limits


def _reserved_positions(model: Any) -> int | None:
    """Positions the model's absolute position table spends before the first token, or None
    when it has no such table.

    RoBERTa, XLM-R, CamemBERT, Longformer and kin build ``position_embeddings`` with
    ``padding_idx=pad_token_id`` and number real tokens from ``padding_idx + 1``; BERT's table
    has no padding index and starts at 0.
    """
    import torch.nn as nn

    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("position_embeddings", "wpe") and isinstance(module, nn.Embedding):
            return module.padding_idx + 1 if module.padding_idx is not None else 0
    return None


class HFRewardScorer:
    """A loaded reward model and tokenizer; ``rewards(texts)`` -> float64 array."""

    def __init__(self, path: str, device: str = "auto", max_length: int = 1024, batch_size: int = 16) -> None:
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError:
            raise MissingDependency("transformers", purpose="hf: reward models") from None
        from prefcurate.backends.embed import _quiet_hf, resolve_device

        self.path = path
        self.device = resolve_device(device)
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.max_length, self.batch_size = max_length, batch_size
        try:
            with _quiet_hf():
                self.tokenizer = AutoTokenizer.from_pretrained(path)
                self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=self.dtype)
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(
                f"could not load reward model {path!r}: {first}", "give a local path or a cached Hub id"
            ) from None
        self.num_labels = int(self.model.config.num_labels)
        if self.num_labels not in (1, 2):
            raise ConfigError(
                f"reward model {path!r} has {self.num_labels} labels", "a reward model has 1 output (or 2 classes)"
            )
        self._set_padding()
        self.limits = model_limits(self.tokenizer, self.model)
        self.max_length = min([max_length, *self.limits.values()])
        self.model.to(self.device).eval()
        self.has_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.truncated = 0
        self.template_failures = 0

    def _set_padding(self) -> None:
        tok = self.tokenizer
        if tok.pad_token is None:
            fallback = tok.eos_token or tok.unk_token
            if fallback is None:
                raise ConfigError("the reward model's tokenizer has no pad, eos or unk token to pad batches with")
            tok.pad_token = fallback
        tok.padding_side = "right"
        tok.truncation_side = "left"
        self.model.config.pad_token_id = tok.pad_token_id

    def render(self, prompt: list[dict[str, str]], response: list[dict[str, str]]) -> str:
        messages = [*(prompt or []), *(response or [])]
        if self.has_template:
            import jinja2

            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False)
            except jinja2.TemplateError:
                # A template that rejects this conversation (e.g. roles must alternate).
                self.template_failures += 1
        return render_transcript(messages)

    def rewards(self, texts: list[str], progress: ProgressTask | None = None) -> np.ndarray:
        import torch

        special = not self.has_template  # a chat template writes its own special tokens
        # verbose=False: no "longer than the maximum" warning, the overlong ones are truncated and counted below
        ids = self.tokenizer(texts, add_special_tokens=special, truncation=False, verbose=False)["input_ids"]
        long = [i for i, x in enumerate(ids) if len(x) > self.max_length]
        if long:
            self.truncated += len(long)
            cut = self.tokenizer(
                [texts[i] for i in long], add_special_tokens=special, truncation=True, max_length=self.max_length
            )["input_ids"]
            for i, x in zip(long, cut, strict=True):
                ids[i] = x
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.empty(len(texts), dtype=np.float64)
        for start in range(0, len(order), self.batch_size):
            pick = order[start : start + self.batch_size]
            enc = self.tokenizer.pad({"input_ids": [ids[i] for i in pick]}, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            try:
                with torch.inference_mode():
                    logits = self.model(**enc).logits.float()
            except (RuntimeError, IndexError) as exc:
                raise StageFailed(
                    f"reward model {self.path!r} failed on a batch: {exc}",
                    "check that the tokenizer belongs to the model; lower --batch-size if out of memory",
                ) from exc
            out[pick] = logits[:, -1].cpu().numpy()
            if progress is not None:
                progress.advance(len(pick))
        return out


@dataclass
class WindowScores:
    """One window's rewards and what the scorer noticed on it (picklable: it crosses workers)."""

    chosen: np.ndarray
    rejected: np.ndarray
    truncated: int
    template_failures: int
    device: str
    dtype: str
    chat_template: bool
    max_length: int  # tokens per text actually used: --max-length, or the model's limit below it
    limits: dict[str, int]


class WindowScorer:
    """Scores windows of rows; built once per worker (the model loads there, not per window).

    Under the Ray engine ``functools.partial(WindowScorer, ...)`` is shipped to GPU actors, so
    the driver never loads the model; locally it is built in process with the progress task.
    """

    def __init__(
        self, path: str, device: str, max_length: int, batch_size: int, progress: ProgressTask | None = None
    ) -> None:
        self.scorer = HFRewardScorer(path, device, max_length, batch_size)
        self.progress = progress

    def __call__(self, batch: pa.RecordBatch) -> WindowScores:
        s = self.scorer
        truncated, failures = s.truncated, s.template_failures
        prompts, chosen, rejected = (batch.column(c).to_pylist() for c in COLUMNS)
        texts = [s.render(p, c) for p, c in zip(prompts, chosen, strict=True)]
        texts += [s.render(p, r) for p, r in zip(prompts, rejected, strict=True)]
        scores = s.rewards(texts, self.progress)
        k = batch.num_rows
        dtype = str(s.dtype).removeprefix("torch.")
        return WindowScores(
            scores[:k],
            scores[k:],
            s.truncated - truncated,
            s.template_failures - failures,
            s.device,
            dtype,
            s.has_template,
            s.max_length,
            dict(s.limits),
        )


class HFRewardMember:
    def __init__(self, spec: str, name: str, options: MemberOptions) -> None:
        self.spec, self.name, self.options = spec, name, options
        self.path = spec[3:]

    def columns(self) -> list[str]:
        return list(COLUMNS)

    def score(self, source: StageInput, ctx: StageContext) -> MemberScores:
        """Forward passes through ``engines.map_batches``: in process locally (progress per
        forward batch), on an actor pool under Ray (one GPU per actor when the cluster has them)."""
        from prefcurate.engines import map_batches

        opts = self.options
        n = source.num_rows
        task = ctx.progress.task(f"{self.name}: scoring", total=2 * n, unit="texts")
        remote = getattr(ctx.engine, "map_batches", None) is not None
        make = partial(WindowScorer, self.path, opts.device, opts.max_length, opts.batch_size, None if remote else task)
        rc, rr = np.full(n, np.nan), np.full(n, np.nan)
        seen: dict[str, Any] = {
            "device": [],
            "dtype": [],
            "chat_template": True,
            "truncated": 0,
            "failures": 0,
            "max_length": None,
            "limits": {},
        }
        start = 0
        windows = map_batches(ctx, make, source, columns=COLUMNS, batch_rows=WINDOW_ROWS, uses_gpu=True)
        for w in windows:
            k = len(w.chosen)
            rc[start : start + k], rr[start : start + k] = w.chosen, w.rejected
            start += k
            if not w.chat_template and seen["chat_template"]:
                ctx.progress.note(
                    f"{self.spec}: the tokenizer has no chat template; scoring plain 'User:/Assistant:' transcripts"
                )
            seen["chat_template"] = w.chat_template
            if seen["max_length"] is None:
                seen["max_length"], seen["limits"] = w.max_length, w.limits
                if w.max_length < opts.max_length:
                    ctx.progress.note(f"{self.spec}: {self._lowered(w.max_length, w.limits)}")
            seen["truncated"] += w.truncated
            seen["failures"] += w.template_failures
            for key in ("device", "dtype"):
                if getattr(w, key) not in seen[key]:
                    seen[key].append(getattr(w, key))
            if remote:
                task.advance(2 * k)
        return MemberScores(rc - rr, rc, rr, self._info(seen, n, ctx))

    def _info(self, seen: dict[str, Any], n: int, ctx: StageContext) -> dict[str, Any]:
        opts = self.options
        max_length = seen["max_length"] or opts.max_length
        info: dict[str, Any] = {
            "device": ",".join(seen["device"]) or opts.device,
            "dtype": ",".join(seen["dtype"]) or None,
            "max_length": max_length,
            "chat_template": seen["chat_template"],
            "texts": 2 * n,
            "truncated": seen["truncated"],
        }
        if max_length < opts.max_length:
            info["max_length_requested"] = opts.max_length
            info["max_length_limited_by"] = _limited_by(max_length, seen["limits"])
        if seen["failures"]:
            info["template_failures"] = seen["failures"]
        if seen["truncated"]:
            limit = (
                f"--max-length {opts.max_length}"
                if max_length == opts.max_length
                else f"the model's limit of {max_length}"
            )
            ctx.progress.note(
                f"{self.spec}: {seen['truncated']:,} of {2 * n:,} texts were longer than {limit} tokens "
                "and lost their start"
            )
        return info

    def _lowered(self, max_length: int, limits: dict[str, int]) -> str:
        return (
            f"--max-length {self.options.max_length} lowered to {max_length} tokens, "
            f"{_limited_by(max_length, limits)}; longer texts lose their start"
        )


def _limited_by(max_length: int, limits: dict[str, int]) -> str:
    """Which declared limit set the cap (the tokenizer's first when both agree)."""
    return next((name for name, value in limits.items() if value == max_length), "the model's limit")
