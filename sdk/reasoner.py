"""The product reasoner at run time: greedy generation with ONNX Runtime and a NumPy KV cache.

    from sdk.reasoner import Reasoner
    r = Reasoner("moon3.engine")
    r.generate(image="shoe.jpg", task="caption")                 # -> "Nike Men Black Running Shoes"
    r.generate(text="Puma Men Blue T-shirt", task="attributes")  # -> "article type: Tshirts; colour: Blue; ..."
    r.generate(image="shoe.jpg", task="attribute_qa", key="colour")
    r.last_stats                                                  # prefill / decode tokens per second

The engine's "reasoner" section names its graphs (see `sdk.export.onnx_reasoner`): the visual
graph (photo -> every decoder layer's adapter keys/values, run once per photo) and, as "prefill"
and "decode", the step graph (tokens + cache -> logits + grown cache; the prompt is read with an
empty cache); older engines name a separate prefill graph (prompt -> logits + cache). Graphs may
be FP32, INT8 or INT4 weight-only (the section's "precision"); ONNX Runtime's CPU provider runs
them all, and `providers=` picks other backends as `sdk.Embedder` does. Decoding is greedy, so the
same inputs always give the same text. Never imports torch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from sdk.errors import EngineError, InvalidInputError
from sdk.sessions import ActiveBackend

SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>", "<think>", "</think>")  # token ids 0..5 (sdk.train.reasoner_model too)
PAD, BOS, EOS, SEP, THINK, END_THINK = range(len(SPECIALS))

if TYPE_CHECKING:
    from sdk.engine import EngineFile


class OnnxDecoder:
    """Greedy generation over the reasoner graphs (ONNX Runtime sessions).

    `prefill` and `decode` may be one session: a step graph with cache inputs reads the prompt
    with a cache of length 0. Three engine generations are read: per-layer cache inputs
    (past_k_0.., past_v_0.. (B, h, P, c); current), one cache stacked over layers (past_k, past_v
    (L, B, h, P, c)), and the oldest, a prefill graph without cache inputs beside a stacked decode graph.
    """

    def __init__(self, visual, prefill, decode=None):
        self.visual_session, self.prefill, self.decode = visual, prefill, decode if decode is not None else prefill
        inputs = {i.name: i.shape for i in prefill.get_inputs()}
        shape = inputs["visual_k"]  # (L, B, h, n, c)
        self.L, self.h, self.n, self.c = (int(shape[k]) for k in (0, 2, 3, 4))
        step_inputs = {i.name for i in self.decode.get_inputs()}
        self._per_layer = "past_k_0" in step_inputs
        self._prefill_past = "past_k" in inputs or "past_k_0" in inputs
        # the step's cache outputs, in output order, and the input each one feeds next step
        outs = [o.name for o in self.decode.get_outputs()][1:]
        self._feeds_next = [name.replace("present", "past", 1) for name in outs]
        missing = sorted(set(self._feeds_next) - step_inputs)
        if missing:
            raise EngineError(f"the reasoner's step graph outputs {outs} do not match its cache inputs ({missing})")

    def visual(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Adapter keys/values (L, B, h, n, c) of preprocessed photos (B, 3, H, W)."""
        vk, vv = self.visual_session.run(["visual_k", "visual_v"], {"pixels": np.ascontiguousarray(pixels, np.float32)})
        return vk, vv

    def _empty_cache(self) -> dict[str, np.ndarray]:
        shape = (1, self.h, 0, self.c) if self._per_layer else (self.L, 1, self.h, 0, self.c)
        empty = np.zeros(shape, np.float32)
        return {name: empty for name in self._feeds_next}

    def generate(self, prompt: Sequence[int], visual_kv: tuple[np.ndarray, np.ndarray] | None, max_new_tokens: int,
                 return_logits: bool = False, stats: dict | None = None):
        """Greedy tokens after `prompt` (stops at <eos> or the budget); one item."""
        if visual_kv is None:
            vk = vv = np.zeros((self.L, 1, self.h, self.n, self.c), np.float32)
            vmask = np.zeros(1, np.float32)
        else:
            vk, vv = visual_kv
            vmask = np.ones(1, np.float32)
        visual = {"visual_k": vk, "visual_v": vv, "visual_mask": vmask}
        feed = {"input_ids": np.asarray([prompt], np.int64), **visual}
        if self._prefill_past:
            feed.update(self._empty_cache())
        t0 = time.perf_counter()
        logits, *cache = self.prefill.run(None, feed)
        t1 = time.perf_counter()
        out: list[int] = []
        seen: list[np.ndarray] = []
        for _ in range(max_new_tokens):
            if return_logits:
                seen.append(logits[0])
            nxt = int(np.argmax(logits[0]))
            if nxt == EOS:
                break
            out.append(nxt)
            if len(out) == max_new_tokens:
                break
            step = {"input_ids": np.asarray([[nxt]], np.int64), **visual, **dict(zip(self._feeds_next, cache))}
            logits, *cache = self.decode.run(None, step)
        t2 = time.perf_counter()
        if stats is not None:
            stats.update(prompt_tokens=len(prompt), new_tokens=len(out), prefill_s=t1 - t0, decode_s=t2 - t1,
                         prefill_tokens_per_s=len(prompt) / max(t1 - t0, 1e-9),
                         decode_tokens_per_s=max(len(out) - 1, 0) / max(t2 - t1, 1e-9))
        return (out, seen) if return_logits else out


@dataclass
class Generation:
    """What `Reasoner.generate` wrote, with its cost."""

    text: str
    tokens: int
    stats: dict


class Reasoner(ActiveBackend):
    """Writes titles, categories, attributes, answers and reasoning traces for products.

    Args:
        path: a `moon3.engine` with a reasoner section (or an open `sdk.engine.EngineFile`). Its
            header and manifest are verified at once, each reasoner part against its checksum
            when read, before it runs; the embedder's parts are not read.
        threads: ONNX Runtime intra-op threads (None: its default).
        providers: backend names from `sdk.embedder.BACKENDS`, in order of preference ("cpu",
            "cuda", "tensorrt"), or one name; None means ["cpu"].

    Raises:
        EngineError: the file is damaged or has no reasoner.
        ValueError, BackendUnavailableError: as `sdk.Embedder`, for `providers` and `threads`.

    Warns:
        RuntimeWarning: as `sdk.Embedder`, when ONNX Runtime does not activate a requested backend.
    """

    def __init__(self, path: str | os.PathLike | EngineFile, threads: int | None = None,
                 providers: str | Sequence[str] | None = None):
        self._load(path, providers, threads)  # reads only the reasoner's parts

    def _init(self, engine: EngineFile, names: list[str], threads: int | None, ort) -> None:
        from sdk.preprocess import ImagePreprocess
        from sdk.sessions import EngineSessions

        self._path = engine.path
        spec = engine.manifest.get("reasoner")
        if not isinstance(spec, dict):
            raise EngineError(f"{self._path}: this engine has no reasoner; build one with `moon3 build --reasoner`")
        try:
            parts = {k: str(spec["parts"][k]) for k in ("visual", "prefill", "decode", "tokenizer")}
            self.tasks: dict[str, str] = dict(spec["tasks"])
            self.max_len = int(spec["max_len"])
            image_kw = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["image"].items()}
            self._image = ImagePreprocess(**image_kw)
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"{self._path}: the reasoner section is unusable ({type(exc).__name__}: {exc})") from exc
        opener = EngineSessions(engine, names, threads, ort)
        sessions: dict[str, Any] = {}  # one session per part: prefill and decode may name one step graph
        for k in ("visual", "prefill", "decode"):
            if parts[k] not in sessions:
                sessions[parts[k]] = opener.open(parts[k], what="reasoner part")
        # every session was asked for the same providers; the step graph runs nearly all the work
        self._activate(sessions[parts["decode"]].get_providers(), names, "the reasoner")
        from tokenizers import Tokenizer

        blob = engine.part(parts["tokenizer"])
        try:
            self._tok = Tokenizer.from_str(blob.decode("utf-8"))
        except Exception as exc:  # noqa: BLE001
            raise EngineError(f"{self._path}: reasoner tokenizer cannot be loaded: {exc}") from exc
        try:
            self._dec = OnnxDecoder(*(sessions[parts[k]] for k in ("visual", "prefill", "decode")))
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"{self._path}: the reasoner graphs have unexpected inputs "
                              f"({type(exc).__name__}: {exc})") from exc
        # "fp32", "int8" or "int4" (weight-only MatMulNBits); engines from before quantization are fp32
        self.precision: str = str(spec.get("precision", "fp32"))
        self.last_stats: dict = {}
        self._heads = _heads_spec(spec.get("heads"), self._dec.visual_session, self._path)
        # the fields the visual graph's attribute heads read from a photo (empty: no heads)
        self.heads: tuple[str, ...] = tuple(k for k, *_ in self._heads)
        self._max_pairs = int((spec.get("heads") or {}).get("max_pairs", 8))  # an "attributes" answer's length

    def prompt_ids(self, task: str, text: str | None = None, **fields: str) -> list[int]:
        """`<bos> instruction [title: text] <sep>` as token ids."""
        if task not in self.tasks:
            raise InvalidInputError(f"unknown task {task!r}; the engine's tasks are {sorted(self.tasks)}")
        try:
            instruction = self.tasks[task].format(**fields)
        except KeyError as exc:
            raise InvalidInputError(f"task {task!r} needs {exc.args[0]}=... ({self.tasks[task]!r})") from None
        prompt = f"{instruction} title: {text}" if text else instruction
        return [BOS] + self._tok.encode(prompt).ids + [SEP]

    def read(self, image: Any) -> dict[str, tuple[str, float]]:
        """What the engine's attribute heads are sure of in a photo: {field: (value, probability)},
        in field order, for the fields whose most likely value is not "absent" and clears the
        field's threshold (picked on held-out training products when the heads were fitted).

        Raises:
            EngineError: the engine's reasoner has no attribute heads (`self.heads` is empty).
            InvalidInputError: the image cannot be read.
        """
        if not self._heads:
            raise EngineError(f"{self._path}: this engine's reasoner has no attribute heads; build it with "
                              "`moon3 build` and committed heads, or --attribute-heads DIR")
        probs = self._dec.visual_session.run(["attributes"], {"pixels": self._pixels(image)})[0][0]
        return {k: (v, p) for k, (v, p, sure) in self._best(probs).items() if sure}

    def _pixels(self, image: Any) -> np.ndarray:
        """A photo as the visual graph reads it: (1, 3, H, W) float32 (InvalidInputError if unreadable)."""
        from sdk.preprocess import image_to_array, load_image

        return image_to_array(load_image(image, name="image"), self._image)[None]

    def _best(self, probs: np.ndarray) -> dict[str, tuple[str, float, bool]]:
        """Per field: (most likely value other than "absent", its probability, whether the heads are sure of it)."""
        out = {}
        for key, classes, threshold, start in self._heads:
            p = probs[start : start + len(classes)]
            top = int(np.argmax(p))
            value = int(np.argmax(p[1:])) + 1  # the best real value, even where "absent" wins
            out[key] = (classes[value], float(p[value]), top != 0 and float(p[top]) >= threshold)
        return out

    def _heads_answer(self, probs: np.ndarray, task: str, fields: dict) -> str | None:
        """The answer of a photo's attribute, category or attribute-QA task read from the heads (None: not theirs)."""
        best = self._best(probs)
        if task == "attributes":
            pairs = [f"{k}: {v}" for k, (v, _, sure) in best.items() if sure and v][: self._max_pairs]
            return "; ".join(pairs) or None
        if task == "category" and "article type" in best:
            return best["article type"][0]
        if task == "attribute_qa" and str(fields.get("key", "")).lower() in best:
            return best[str(fields["key"]).lower()][0]
        return None

    def generate(self, image: Any = None, text: str | None = None, task: str = "trace", max_new_tokens: int = 96,
                 **fields: str) -> str:
        """Greedy text for one product (photo and/or title); see `self.tasks` for the tasks.

        With a photo, an engine whose reasoner has attribute heads (`self.heads`) answers the
        "attributes", "category" and "attribute_qa" tasks from them (they read the photo only):
        the fields they are sure of, the most likely article type, the asked field's value.

        Args:
            image: a path, bytes, PIL image or HWC uint8 array; or None.
            text: the product title (context); or None.
            task: "caption", "category", "attributes", "attribute_qa" (key=...), "qa" (question=...), "trace".
            max_new_tokens: token budget of the answer.

        Raises:
            InvalidInputError: no input, an unreadable image, a bad budget or an unknown task.
        """
        return self.decode(self.generate_ids(image, text, task, max_new_tokens, **fields))

    def generate_ids(self, image: Any = None, text: str | None = None, task: str = "trace", max_new_tokens: int = 96,
                     **fields: str) -> list[int]:
        """The greedy token ids `generate` decodes (without <eos>); same arguments and errors."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InvalidInputError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if text is not None and not isinstance(text, str):
            raise InvalidInputError(f"text must be a str or None, got {type(text).__name__}")
        text = text.strip() if text else None
        if image is None and not text and task != "qa":
            raise InvalidInputError("nothing to reason about: give an image and/or a text")
        ids = self.prompt_ids(task, text, **fields)
        if len(ids) >= self.max_len:
            raise InvalidInputError(f"the prompt is {len(ids)} tokens; the reasoner reads at most {self.max_len - 1}")
        vkv = None
        budget = min(max_new_tokens, self.max_len - len(ids))
        if image is not None:
            pixels = self._pixels(image)
            if self._heads and task in ("attributes", "category", "attribute_qa"):
                t0 = time.perf_counter()
                # one run gives the heads and, should they not answer, the decoder's visual keys/values
                vk, vv, probs = self._dec.visual_session.run(["visual_k", "visual_v", "attributes"], {"pixels": pixels})
                answer = self._heads_answer(probs[0], task, fields)
                if answer is not None:
                    # the budget is the caller's: the language model's context does not bound the heads
                    out = self._tok.encode(answer, add_special_tokens=False).ids[:max_new_tokens]
                    self.last_stats = {"prompt_tokens": len(ids), "new_tokens": len(out), "heads": True,
                                       "seconds": time.perf_counter() - t0}
                    return out
                vkv = (vk, vv)
            else:
                vkv = self._dec.visual(pixels)
        stats: dict = {}
        out = self._dec.generate(ids, vkv, budget, stats=stats)
        self.last_stats = stats
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated token ids (<think> / </think> kept as words)."""
        return decode_ids(self._tok, ids)


def _heads_spec(spec: Any, visual_session, path) -> list[tuple[str, list[str], float, int]]:
    """(key, classes, threshold, offset into the visual graph's "attributes" output) per field of
    the reasoner section's "heads" record ([] without one)."""
    if spec is None:
        return []
    try:
        out, start = [], 0
        for key, classes, threshold in spec["fields"]:
            out.append((str(key), [str(c) for c in classes], float(threshold), start))
            start += len(classes)
        width = {o.name: o.shape for o in visual_session.get_outputs()}["attributes"][-1]
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(f"{path}: the reasoner's attribute heads are unusable ({type(exc).__name__}: {exc})") from exc
    if isinstance(width, int) and width != start:
        raise EngineError(f"{path}: the reasoner's visual graph writes {width} attribute probabilities; "
                          f"its heads name {start}")
    return out


def decode_ids(tok, ids: Sequence[int]) -> str:
    """Text of token ids with a `tokenizers` tokenizer; <think> / </think> are kept, other specials dropped."""
    parts, run = [], []
    for i in ids:
        if i in (THINK, END_THINK):
            if run:
                parts.append(tok.decode(run).strip())
                run = []
            parts.append(SPECIALS[i])
        elif i >= len(SPECIALS):
            run.append(i)
    if run:
        parts.append(tok.decode(run).strip())
    return " ".join(p for p in parts if p)
