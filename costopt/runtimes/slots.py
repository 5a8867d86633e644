"""Continuous batching's bookkeeping, shared by every engine: requests, KV slots, steps, sampling.

`SlotEngine` keeps which sequence holds which KV-cache slot and what one step does with them; a
runtime's engine (`engine.Engine` over torch modules, `llamacpp.LlamaCppEngine` over llama.cpp) adds
the model: the logits of one step's tokens and how a slot's cache moves. Both engines had grown the
same slot code twice (found by `duplicates --change`); one copy keeps their semantics equal by
construction, which the server, the driver and the tests rely on.

Slot layout (both runtimes): running sequences ("rows") hold slots 0..n-1, so one decode step is one
contiguous batch; the prompts a step prefills take the slots right after them; paused sequences
stack down from slot max_batch - 1. A finished row's slot takes the last row, so rows stay 0..n-1.

Prefix cache (runtimes that can copy a slot's cache, `PREFIX_CACHE = True`: llama.cpp). The engine keeps
the KV of the last `prefix_cache` prompts it prefilled, each in a cache entry of the runtime's, most
recently used first. A newcomer whose prompt starts with at least `min_prefix` tokens of a kept prompt
gets that entry's KV copied into its slot and prefills only the rest (its last token is always
computed, for its logits): the shared system prompt and chat template of most requests, and the whole
prompt of a repeat, cost no compute. Serving is compute-bound on prefill here (`BENCHMARKS.md`, section
4: the prompts of the `serving-v1` trace are most of the tokens a step computes), which is why this is the
engine's business, as it is vLLM's automatic prefix caching and llama.cpp server's `cache_prompt`. A hit
is exact where the runtime's arithmetic does not depend on the batch (llama.cpp Q8_0/Q4_0/Q4_1, tested).

The interface the server drives: add, cancel, pause, resume, clear, step (one decode over the newest
token of every row plus the newcomers' prompts) -> StepEvents. Greedy at temperature 0; otherwise a
per-request seeded generator, so a sequence's tokens never depend on its batch mates. Not thread-safe:
the driver calls everything from one thread.

Log-probabilities (`SamplingParams.logprobs >= 0`): the step computes, for the rows that asked only,
log_softmax of the row's logits in float32 over the whole vocabulary: the model's own distribution
(temperature 1, no top-p), whatever the request samples with. Each of those rows' StepEvents carries the
chosen token's log-prob, the distribution's entropy and its k most likely tokens (`TokenLogprobs`);
a step with no such row does no extra work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, NamedTuple, Sequence

import torch

FINISH_REASONS = ("stop", "length", "cancelled")
MAX_TOP_LOGPROBS = 20  # most alternatives a step reports per token (OpenAI's chat limit; the server allows 5)
DEFAULT_PREFIX_CACHE = 8  # prompts kept for reuse by engines that can (the server's --prefix_cache default)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64  # tokens generated at most, EOS included
    temperature: float = 0.0  # 0 = greedy (deterministic whatever the seed)
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    seed: int | None = None  # per-request generator: output independent of batch mates; None = random
    stop_token_ids: tuple[int, ...] = ()  # in addition to the engine's EOS ids
    logprobs: int = -1  # -1 = off; 0 = the chosen token's log-prob and entropy; k = also the top k tokens

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: {self.max_new_tokens!r}; must be an integer >= 1")
        if not (isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= 100.0):
            raise ValueError(f"temperature: {self.temperature!r}; must be in [0, 100] (0 = greedy)")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p: {self.top_p!r}; must be in (0, 1]")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed: {self.seed!r}; must be None or an integer in [0, 2**63)")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids: {self.stop_token_ids!r}; must be non-negative token ids")
        if type(self.logprobs) is not int or not -1 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs: {self.logprobs!r}; must be an integer in [-1, {MAX_TOP_LOGPROBS}] "
                             f"(-1 = off, 0 = the chosen token only, k = also the k most likely)")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))


class TokenLogprobs(NamedTuple):
    """One generated token under the distribution it was chosen from (raw logits, float32, temperature 1)."""
    logprob: float  # log-prob of the chosen token, nats
    entropy: float  # of the whole next-token distribution, nats
    top: tuple[tuple[int, float], ...]  # the k most likely (token id, log-prob), most likely first


@dataclass(frozen=True)
class StepEvent:
    seq_id: Hashable
    token_id: int | None  # the new token (EOS/stop ids included); None when cancelled
    finish_reason: str | None  # None while running, else one of FINISH_REASONS
    logprobs: TokenLogprobs | None = None  # only for a sequence whose params ask for them


@dataclass(eq=False, slots=True)
class Seq:
    seq_id: Hashable
    prompt: list[int]
    params: SamplingParams
    stops: frozenset[int]
    generator: torch.Generator | None  # None for greedy
    length: int = 0  # tokens whose K/V are in the cache
    generated: int = 0
    last: int = -1  # the newest token, fed in at the next decode step


@dataclass(eq=False, slots=True)
class Prefix:
    tokens: tuple[int, ...]  # the prompt whose KV the entry holds
    entry: int  # the runtime's cache entry, 0..prefix_cache-1


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(frozen=True)
class StepBatch:
    """One step's tokens, rows first: ids/pos/slots per token; spans (start, length) of each newcomer's
    prompt; out_rows the token positions whose logits are wanted (every row's, each prompt's last)."""
    ids: list[int]
    pos: list[int]
    slots: list[int]
    n_dec: int
    spans: list[tuple[int, int]]
    out_rows: list[int]


class SlotEngine:
    """The slot bookkeeping of a continuous-batching engine; subclasses add the model (see hooks)."""

    PREFIX_CACHE = False  # True where the runtime implements _prefix_save/_prefix_load

    def __init__(self, *, eos_token_ids: Sequence[int], max_batch: int, max_len: int, vocab_size: int,
                 prefix_cache: int = 0, min_prefix: int = 16) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch: {max_batch}; must be >= 1")
        if not isinstance(prefix_cache, int) or prefix_cache < 0:
            raise ValueError(f"prefix_cache: {prefix_cache!r}; must be an integer >= 0 (0 = off)")
        if prefix_cache and not self.PREFIX_CACHE:
            raise ValueError(f"prefix_cache: {prefix_cache}; {type(self).__name__} keeps no prefix cache, use 0")
        if not isinstance(min_prefix, int) or min_prefix < 1:
            raise ValueError(f"min_prefix: {min_prefix!r}; must be an integer >= 1")
        self.max_batch, self.max_len = max_batch, max_len
        self.prefix_cache, self.min_prefix = prefix_cache, min_prefix  # entries kept; shortest hit, tokens
        self._prefixes: list[Prefix] = []  # most recently used first
        self.prompt_tokens = 0  # prompt tokens added so far
        self.reused_tokens = 0  # of which came from the prefix cache, not computed
        self.last_prefill_tokens = 0  # prompt tokens the last step computed
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.vocab_size = vocab_size
        self._rows: list[Seq] = []  # prefilled; row i lives in slot i
        self._paused: list[Seq] = []  # prefilled, not stepped; paused[j] lives in slot max_batch - 1 - j
        self._pending: list[Seq] = []  # added, prefilled at the next step (slots right after the rows)
        self._cancelled: list[StepEvent] = []  # emitted by the next step

    # -- hooks: the runtime's side ------------------------------------------------------------------
    def _logits(self, batch: StepBatch, new: list[Seq]) -> Any:
        """Logits [len(batch.out_rows), vocab] (torch or numpy) of one step; writes the tokens' K/V into
        their slots."""
        raise NotImplementedError

    def _move_slot(self, src: int, dst: int, length: int) -> None:
        """Slot src's first `length` cache positions to slot dst; src is free afterwards."""
        raise NotImplementedError

    def _release_slot(self, slot: int) -> None:
        """A sequence left `slot` (finished, cancelled, moved): drop what the runtime keeps for it."""

    def _stash(self, slot: int, length: int) -> Any:
        """Set slot's cache aside while the rows move (pause, resume); `_unstash` puts it back."""
        raise NotImplementedError

    def _unstash(self, held: Any, slot: int, length: int) -> None:
        raise NotImplementedError

    def _reset(self) -> None:
        """`clear`: empty the runtime's cache."""

    def _prefix_save(self, slot: int, entry: int, length: int) -> None:
        """Slot's first `length` cache positions into prefix-cache entry `entry` (the slot keeps its own)."""
        raise NotImplementedError

    def _prefix_load(self, entry: int, slot: int, length: int) -> None:
        """Entry's first `length` cache positions into the (empty) slot."""
        raise NotImplementedError

    # -- the driver's side ------------------------------------------------------------------------
    @property
    def running(self) -> int:
        """Sequences holding a slot (stepping, paused, or waiting for their prefill)."""
        return len(self._rows) + len(self._paused) + len(self._pending)

    def has_work(self) -> bool:
        """Something to step: running rows, prompts to prefill or cancellations to report (paused
        sequences alone are not: they wait for `resume`)."""
        return bool(self._rows or self._pending or self._cancelled)

    @property
    def paused(self) -> int:
        return len(self._paused)

    def add(self, seq_id: Hashable, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Queue a sequence; its prompt is prefilled and its first token produced by the next step()."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt: empty; it needs at least 1 token")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"prompt: token ids must be in [0, {self.vocab_size}) (the vocabulary)")
        total = len(prompt) + params.max_new_tokens
        if total > self.max_len:
            raise ValueError(f"prompt: {len(prompt)} tokens + max_tokens {params.max_new_tokens} = {total} "
                             f"exceeds the context limit of {self.max_len} tokens; shorten the prompt or "
                             f"lower max_tokens")
        if any(s.seq_id == seq_id for s in self._rows + self._paused + self._pending):
            raise ValueError(f"seq_id: {seq_id!r} is already running")
        if self.running >= self.max_batch:
            raise RuntimeError(f"no free slot: {self.running} of max_batch={self.max_batch} running; "
                               f"admit at most max_batch - running sequences")
        generator = None
        if params.temperature > 0:
            generator = torch.Generator()
            generator.manual_seed(params.seed) if params.seed is not None else generator.seed()
        stops = self.eos_token_ids | frozenset(params.stop_token_ids)
        self._pending.append(Seq(seq_id, prompt, params, stops, generator))

    def cancel(self, seq_id: Hashable) -> None:
        """Free `seq_id`'s slot now; the next step() emits StepEvent(seq_id, None, "cancelled").

        A sequence that already finished (or never ran) is not an error: a client may hang up just as
        its last token is produced. Nothing is emitted for it then.
        """
        for i, s in enumerate(self._pending):
            if s.seq_id == seq_id:
                del self._pending[i]  # never prefilled: it holds no cache
                self._cancelled.append(StepEvent(seq_id, None, "cancelled"))
                return
        for i, s in enumerate(self._rows):
            if s.seq_id == seq_id:
                self._free_row(i)
                self._cancelled.append(StepEvent(seq_id, None, "cancelled"))
                return
        for j, s in enumerate(self._paused):
            if s.seq_id == seq_id:
                self._drop_paused(j)
                self._cancelled.append(StepEvent(seq_id, None, "cancelled"))
                return

    def pause(self, seq_id: Hashable) -> None:
        """Stop stepping a prefilled sequence; it keeps its slot and its cache until `resume`. A scheduler
        pauses lower-priority sequences so that a smaller batch steps faster for an urgent one."""
        i = next((i for i, s in enumerate(self._rows) if s.seq_id == seq_id), None)
        if i is None:
            raise ValueError(f"pause: {seq_id!r} is not a running, prefilled sequence")
        seq = self._rows[i]
        held = self._stash(i, seq.length)
        self._free_row(i)  # the last row moves into slot i, so the rows stay 0..n-1
        self._unstash(held, self.max_batch - 1 - len(self._paused), seq.length)
        self._paused.append(seq)

    def resume(self, seq_id: Hashable) -> None:
        """Step a paused sequence again from the next step on, where it left off."""
        j = next((j for j, s in enumerate(self._paused) if s.seq_id == seq_id), None)
        if j is None:
            raise ValueError(f"resume: {seq_id!r} is not paused")
        seq = self._paused[j]
        held = self._stash(self.max_batch - 1 - j, seq.length)
        self._drop_paused(j)
        self._unstash(held, len(self._rows), seq.length)
        self._rows.append(seq)

    def clear(self) -> None:
        """Drop every sequence (running, paused, pending) and pending event, and empty the cache: after a
        step failed midway, the driver fails their requests and starts over from an empty, consistent
        engine."""
        self._rows, self._paused, self._pending, self._cancelled = [], [], [], []
        self._prefixes = []  # _reset empties the entries too
        self._reset()

    def step(self) -> list[StepEvent]:
        """One iteration: prefill the newcomers and decode one token for every other running sequence."""
        events, self._cancelled = self._cancelled, []
        self.last_prefill_tokens = 0
        if not self._rows and not self._pending:
            return events
        n_dec, new = len(self._rows), self._pending
        self._pending = []
        ids = [s.last for s in self._rows]
        pos = [s.length for s in self._rows]
        slots = list(range(n_dec))
        spans, out_rows = [], list(range(n_dec))
        for j, s in enumerate(new):
            self.prompt_tokens += len(s.prompt)
            start = self._prefix_hit(s.prompt, n_dec + j)  # cache positions [0, start) copied, not computed
            spans.append((len(ids), len(s.prompt) - start))
            ids += s.prompt[start:]
            pos += range(start, len(s.prompt))
            slots += [n_dec + j] * (len(s.prompt) - start)
            out_rows.append(len(ids) - 1)
        self.last_prefill_tokens = len(ids) - n_dec
        logits = self._logits(StepBatch(ids, pos, slots, n_dec, spans, out_rows), new)  # [n_dec + len(new), vocab]
        self._rows.extend(new)
        for j, s in enumerate(new):
            s.length = len(s.prompt) - 1  # the +1 below counts the prompt's last token
            self._prefix_keep(s.prompt, n_dec + j)  # before any row moves: the slot holds exactly the prompt
        tokens = self._choose(logits)
        scored = self._logprobs(logits, tokens)  # {row: TokenLogprobs} of the rows that asked
        finished = []
        for i, (s, tok) in enumerate(zip(self._rows, tokens)):
            s.length += 1
            s.generated += 1
            s.last = tok
            reason = "stop" if tok in s.stops else "length" if s.generated >= s.params.max_new_tokens else None
            events.append(StepEvent(s.seq_id, tok, reason, scored.get(i)))
            if reason is not None:
                finished.append(i)
        for i in reversed(finished):  # descending, so every row moved by _free_row is a live one
            self._free_row(i)
        return events

    # -- internals -------------------------------------------------------------------------------
    def _free_row(self, i: int) -> None:
        """Drop row i, moving the last row (and its cache) into slot i so rows stay in slots 0..n-1."""
        self._release_slot(i)
        last = len(self._rows) - 1
        if i != last:
            self._move_slot(last, i, self._rows[last].length)
            self._rows[i] = self._rows[last]
        self._rows.pop()

    def _drop_paused(self, j: int) -> None:
        """Drop paused[j], moving the last paused sequence (and its cache) into its slot."""
        top = self.max_batch - 1
        self._release_slot(top - j)
        last = len(self._paused) - 1
        if j != last:
            self._move_slot(top - last, top - j, self._paused[last].length)
            self._paused[j] = self._paused[last]
        self._paused.pop()

    def _prefix_hit(self, prompt: list[int], slot: int) -> int:
        """Copy the longest kept prefix of `prompt` into `slot`; the number of positions copied (0: none)."""
        best, length = None, 0
        for p in self._prefixes:
            n = common_prefix(p.tokens, prompt)
            if n > length:
                best, length = p, n
        length = min(length, len(prompt) - 1)  # the prompt's last token is computed: its logits are needed
        if best is None or length < self.min_prefix:
            return 0
        self._prefixes.remove(best)
        self._prefixes.insert(0, best)
        self._prefix_load(best.entry, slot, length)
        self.reused_tokens += length
        return length

    def _prefix_keep(self, prompt: list[int], slot: int) -> None:
        """Keep the just-prefilled prompt in `slot` as a prefix entry, unless a kept one already covers it."""
        if not self.prefix_cache or len(prompt) < self.min_prefix:
            return
        tokens = tuple(prompt)
        if any(p.tokens[:len(tokens)] == tokens for p in self._prefixes):
            return
        extended = next((p for p in self._prefixes if tokens[:len(p.tokens)] == p.tokens), None)
        if extended is not None:  # it covers all that entry did (a chat's next turn): take its place
            self._prefixes.remove(extended)
            entry = extended.entry
        elif len(self._prefixes) < self.prefix_cache:
            entry = min(set(range(self.prefix_cache)) - {p.entry for p in self._prefixes})
        else:
            entry = self._prefixes.pop().entry  # the least recently used
        self._prefix_save(slot, entry, len(tokens))
        self._prefixes.insert(0, Prefix(tokens, entry))

    def _choose(self, logits: Any) -> list[int]:
        """Next token per row: argmax, or a sample from the row's own generator."""
        tokens = logits.argmax(-1).tolist()
        for i, s in enumerate(self._rows):
            if s.generator is not None:
                try:
                    tokens[i] = sample(torch.as_tensor(logits[i]), s.params, s.generator)
                except RuntimeError:  # non-finite logits: this row goes greedy, its batch mates never fail
                    pass
        return tokens

    def _logprobs(self, logits: Any, tokens: list[int]) -> dict[int, TokenLogprobs]:
        """log_softmax over the full vocabulary, in float32, for the rows whose params ask for log-probs."""
        rows = [i for i, s in enumerate(self._rows) if s.params.logprobs >= 0]
        if not rows:
            return {}
        lp = torch.log_softmax(torch.as_tensor(logits[rows]).float(), dim=-1)  # [len(rows), vocab]
        chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in rows])).squeeze(1).tolist()
        entropy = torch.special.entr(lp.exp()).sum(-1).tolist()  # -sum p log p; a p of 0 adds 0
        top = lp.topk(max(self._rows[i].params.logprobs for i in rows), dim=-1)  # sorted, most likely first
        top_lp, top_id = top.values.tolist(), top.indices.tolist()  # [len(rows), k] each
        out = {}
        for j, i in enumerate(rows):
            k = self._rows[i].params.logprobs
            out[i] = TokenLogprobs(chosen[j], entropy[j], tuple(zip(top_id[j][:k], top_lp[j][:k])))
        return out


class TensorKVSlots:
    """A SlotEngine's slot moves over one KV tensor `self.kv` [layers, 2, slots, kv_heads, max_len, head_dim]
    (the torch engine's and the CUDA engine's layout): a copy of the slot's first `length` positions."""
    kv: torch.Tensor

    def _move_slot(self, src: int, dst: int, length: int) -> None:
        if src != dst:
            with torch.inference_mode():
                self.kv[:, :, dst, :, :length] = self.kv[:, :, src, :, :length]

    def _stash(self, slot: int, length: int) -> torch.Tensor:
        with torch.inference_mode():
            return self.kv[:, :, slot, :, :length].clone()

    def _unstash(self, held: torch.Tensor, slot: int, length: int) -> None:
        with torch.inference_mode():
            self.kv[:, :, slot, :, :length] = held


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Temperature + nucleus (top-p) sampling of one row of logits [vocab] with the request's generator.

    Safe for every temperature > 0 and top_p in (0, 1]: the largest logit is subtracted before
    scaling, so a tiny temperature is greedy rather than inf/inf = NaN, and the most likely token is
    always kept, so a top_p below float32's resolution is greedy rather than an empty distribution.
    """
    row = logits.float()
    probs = torch.softmax((row - row.max()) / params.temperature, dim=-1)
    if params.top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator))
    sorted_p, order = probs.sort(descending=True)
    keep = (sorted_p.cumsum(0) - sorted_p) < params.top_p  # the smallest prefix reaching top_p
    keep[0] = True
    choice = torch.multinomial(sorted_p * keep, 1, generator=generator)
    return int(order[choice])


def generate_all(engine: SlotEngine, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 progress: Any = None) -> list[list[int]]:
    """Each prompt's new tokens (its stop token left out), through `engine` kept full: a finished
    sequence's slot goes to the next prompt at once, so no step is spent on padding or on rows that are
    done, as in a left-padded `generate` batch. `progress` (e.g. a tqdm bar) is updated per prompt."""
    out: list[list[int]] = [[] for _ in prompts]
    queue = iter(range(len(prompts)))
    running = 0
    for i in queue:  # fill every slot
        engine.add(i, prompts[i], params)
        running += 1
        if running == engine.max_batch:
            break
    while running:
        for ev in engine.step():
            if ev.token_id is not None and ev.finish_reason != "stop":
                out[ev.seq_id].append(ev.token_id)
            if ev.finish_reason is not None:
                running -= 1
                if progress is not None:
                    progress.update(1)
                nxt = next(queue, None)
                if nxt is not None:
                    engine.add(nxt, prompts[nxt], params)
                    running += 1
    return out


# -- timing, shared by the engines' command-line benches ------------------------------------------------
class EngineTiming(NamedTuple):
    decode_tok_s: float  # new tokens per second summed over the batch, after the step that prefills them
    e2e_tok_s: float  # every new token over the whole run, the prefill step included
    decode_tok_per_cpu_s: float  # decode tokens per CPU-second of this process (robust to other jobs)


def bench_prompts(batch: int, vocab: int) -> list[list[int]]:
    """`batch` fixed pseudo-random prompts of 40-80 tokens (speed does not depend on their content)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(100, vocab, (40 + (17 * i) % 41,), generator=gen).tolist() for i in range(batch)]


def time_engine(engine: SlotEngine, prompts: Sequence[Sequence[int]], new_tokens: int) -> EngineTiming:
    """One run of `prompts` together, `new_tokens` each (build the engine with no EOS ids)."""
    import time

    for i, p in enumerate(prompts):
        engine.add(i, p, SamplingParams(max_new_tokens=new_tokens))
    t0 = time.perf_counter()
    engine.step()  # prefill of every prompt + their first tokens
    t1, c1 = time.perf_counter(), time.process_time()
    while engine.has_work():
        engine.step()
    t2, c2 = time.perf_counter(), time.process_time()
    n = len(prompts) * (new_tokens - 1)
    return EngineTiming(n / (t2 - t1), len(prompts) * new_tokens / (t2 - t0), n / (c2 - c1))
