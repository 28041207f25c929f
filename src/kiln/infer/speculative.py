"""Speculative decoding: a small draft model of the same tokenizer (the student `kiln distill`
makes) proposes `k` tokens for each running row, one cheap step at a time, and the served model
checks all of them in one forward over `k + 1` positions; every row keeps the drafted tokens up
to the first its model disagrees with, plus one token of the model's own, so each round yields
1 to k + 1 tokens for one forward of the big model.

The rule that decides (Leviathan et al. 2023; Chen et al. 2023) keeps the output distributed
exactly as the model's own sampling: drafted token d, drawn from the draft's distribution q (after
the row's temperature, top-k and top-p), is kept with probability min(1, p(d) / q(d)) under the
model's p; at the first refusal the row's token is drawn from max(0, p - q), renormalised; when
all k are kept, one more comes from p at the last position. At temperature 0 both distributions
are one-hot, so a drafted token is kept exactly when it is the model's argmax, and the output is
the model's greedy output token for token.

Each row's cache (the model's and the draft's) then keeps the positions of the tokens that were
accepted; the slots past them hold refused drafts, which the next forward overwrites (a row sees
its own slots only up to its length). Rows whose sequences end mid-round (an end token, a stop
string, the budget) free their rows as in a plain step. A round is only taken while every
running row has room for k + 1 more positions, no row uses a repetition penalty (its counts
would change with every kept token), and at most `MAX_ROWS` rows run (verifying k + 1 tokens for
a full batch costs more compute than it saves); otherwise the batch takes a plain step; and,
by default, only while rounds beat plain steps on this host (`Pace`). The draft's cache catches
up lazily, so plain steps and prefills cost the draft nothing: at a round's start, the few tokens
of a row it has not read (the last draft of a round that kept them all, the tokens of a few plain
steps) go into the round's first draft forward, and a longer gap (a new prompt) is read first,
in one forward per run of rows.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from kiln.infer import decode
from kiln.infer.engine import Batch, _RowView, adjacent_runs, right_padded, sample_next, sampling_probs
from kiln.model.transformer import KVCache

MAX_ROWS = 4  # speculate while at most this many rows run; a fuller batch is compute-bound


def accept(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, draws: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The acceptance rule, for R rows of k drafted tokens: `p` (R, k + 1, V) the model's sampling
    distributions at each drafted position and one past them, `q` (R, k, V) the draft's, `drafted`
    (R, k) the drafted tokens (drawn from q), `draws` (R, k + 1) uniform in [0, 1). Returns (kept,
    token): how many drafted tokens each row keeps (drafted token i is kept with probability
    min(1, p_i(d) / q_i(d)), the first refusal ends the row's run) and the row's next token (drawn
    from max(0, p - q) renormalised at the refusal, from p past the last draft when all are kept)."""
    r, k = drafted.shape
    rows = torch.arange(r, device=p.device)
    p_d = p[:, :k].gather(-1, drafted[..., None])[..., 0]
    q_d = q.gather(-1, drafted[..., None])[..., 0]
    keep = draws[:, :k] * q_d < p_d  # never where p = 0
    kept = keep.long().cumprod(1).sum(1)
    at = kept.clamp(max=k - 1)
    residual = (p[rows, at] - q[rows, at]).clamp(min=0)
    final = torch.where((kept < k)[:, None], residual, p[:, k])
    final = torch.where(final.sum(-1, keepdim=True) > 0, final, p[rows, kept])  # p = q exactly: nothing left over
    cdf = final.cumsum(-1)
    pick = torch.searchsorted(cdf, draws[:, k:] * cdf[:, -1:], right=True)
    return kept, pick[:, 0].clamp(max=final.shape[-1] - 1)


def attach(batch: Batch, draft: nn.Module, k: int = 4, compile: bool = False, warm: bool = True,
           adapt: bool = True) -> Drafter | None:
    """Decode `batch` speculatively with `draft` proposing `k` tokens a round; returns its `Drafter`,
    or None where the batch cannot (a model in training or wrapped, or without the fused step). With
    `warm`, the draft's decode step is warmed up now, on this thread (else by `batch.warm_up()`);
    with `adapt`, rounds are taken only while they pay on this host (`Pace`), else whenever allowed."""
    if not batch.inference or batch.fast is None:
        return None
    batch.drafter = Drafter(draft, batch, k, compile, adapt)
    if warm:
        batch.drafter.warm_up()
    return batch.drafter


class Pace:
    """Whether speculative rounds pay, from what rounds and plain steps measure on this host, kept
    per number of running rows (a round over 1 row and one over 4 cost differently): the tokens
    per second of the last few rounds (decayed sums of their tokens and seconds) against those of
    plain steps. Rounds pay when the draft agrees often and costs little against the model; a weak
    or slow draft (or a model so small that a forward of k + 1 tokens costs like k + 1 forwards)
    makes them slower than plain steps, and then the batch steps plainly for `probe` steps (doubling,
    up to `longest`, while rounds keep losing) before a trial of `trial` rounds decides again. While
    rounds win, a few plain steps every `refresh` rounds keep the plain figure current. Only the
    choice between a round and a plain step depends on timing: greedy output is the model's either
    way, sampled output follows its distribution either way."""

    def __init__(self, probe: int = 8, longest: int = 256, trial: int = 4, refresh: int = 64, decay: float = 0.8,
                 ) -> None:
        self.probe, self.longest, self.trial, self.refresh, self.decay = probe, longest, trial, refresh, decay
        self.plain_s: dict[int, float] = {}  # rows -> seconds of a plain step (a running average)
        self.spec: dict[int, list[float]] = {}  # rows -> decayed [tokens, seconds] of rounds
        self.judged_in = trial  # rounds before the next verdict
        self.wait = 0  # plain steps before rounds may be tried again
        self.backoff = probe
        self.rounds_since: dict[int, int] = {}  # rows -> rounds since the last plain figure
        self.plain_due = 0  # plain steps owed to refresh the plain figure
        self.warm = False  # the last step was plain: the next plain step's time is its settled cost

    def speculate(self, rows: int) -> bool:
        """Whether the next step over `rows` running rows is a round (else a plain step)."""
        if self.plain_due == 0 and (rows not in self.plain_s or self.rounds_since.get(rows, 0) >= self.refresh):
            self.plain_due = 2  # the first runs after a round (or a prefill): only the second is timed
            self.rounds_since[rows] = 0
        if self.plain_due > 0:
            self.plain_due -= 1
            return False
        if self.wait > 0:
            self.wait -= 1
            return False
        return True

    def plain(self, rows: int, seconds: float) -> None:
        """A plain step over `rows` rows took `seconds` (one token each). Only a step after a plain
        step counts: the first after a round runs with the draft's weights in the caches."""
        if self.warm:
            old = self.plain_s.get(rows)
            self.plain_s[rows] = seconds if old is None else old + (1 - self.decay) * (seconds - old)
        self.warm = True

    def round(self, rows: int, tokens: int, seconds: float) -> None:
        """A round over `rows` rows handed out `tokens` in `seconds`."""
        self.warm = False
        acc = self.spec.setdefault(rows, [0.0, 0.0])
        acc[0], acc[1] = self.decay * acc[0] + tokens, self.decay * acc[1] + seconds
        self.rounds_since[rows] = self.rounds_since.get(rows, 0) + 1
        self.judged_in -= 1
        if self.judged_in > 0 or rows not in self.plain_s:
            return
        self.judged_in = 1
        if acc[0] / acc[1] < rows / self.plain_s[rows]:  # rounds lose: step plainly, then a fresh trial
            self.wait, self.backoff, self.judged_in = self.backoff, min(2 * self.backoff, self.longest), self.trial
            self.spec.pop(rows)
        else:
            self.backoff = self.probe


class Drafter:
    """The draft model of a `Batch`: its own KV cache over the batch's rows and `step(hi)`, one
    speculative round for rows 0..hi-1. `length[row]`: the tokens of the row the draft has read
    (behind the batch's after a prefill or plain steps, caught up at the next round). Counts
    `proposed` and `accepted` drafted tokens and `rounds`; with `adapt`, `pace` decides whether
    a round pays (else every allowed round is taken)."""

    def __init__(self, draft: nn.Module, batch: Batch, k: int, compile: bool, adapt: bool = True) -> None:
        cfg = getattr(draft, "cfg", None)
        if not decode.supports(draft):
            raise ValueError("the draft model must be a plain (not quantized, not LoRA) kiln decoder")
        if cfg.vocab_size < batch.vocab:
            raise ValueError(f"the draft model's vocabulary ({cfg.vocab_size}) is smaller than the model's "
                             f"tokenizer ({batch.vocab}); the draft must share the model's tokenizer")
        if k < 1:
            raise ValueError(f"draft_tokens must be at least 1, not {k}")
        p = next(draft.parameters())
        if p.device != batch.device:
            raise ValueError(f"the draft model is on {p.device}, the model on {batch.device}")
        self.model, self.batch, self.k = draft, batch, k
        self.cache = KVCache(cfg, batch.rows, batch.max_len, device=p.device, dtype=p.dtype)
        self.length = [0] * batch.rows
        self.max_len = min(batch.max_len, cfg.max_seq_len)  # the draft's positions end at its own context
        self.fast = decode.decode_step(draft, compile)
        self.pace = Pace() if adapt else None
        self.proposed = self.accepted = self.rounds = 0

    @property
    def acceptance(self) -> float:
        """The share of drafted tokens the model kept."""
        return self.accepted / self.proposed if self.proposed else 0.0

    def warm_up(self) -> None:
        """Compile the draft's step and the checks of both models (a no-op without compiling)."""
        self.fast.warm_up(self.cache, verify=self.k + 1)
        self.batch.fast.warm_up(self.batch.cache, verify=self.k + 1)

    def took_plain(self, rows: int, seconds: float) -> None:
        """The batch took a plain step over `rows` running rows in `seconds` (for `pace`)."""
        if self.pace is not None and rows <= MAX_ROWS:
            self.pace.plain(rows, seconds)

    def _unread(self, row: int) -> list[int]:
        """Row `row`'s tokens the draft has not read, through the newest (`last`, not in the batch's cache)."""
        seq, lo, hi = self.batch.seqs[row], self.length[row], self.batch.length[row] + 1
        n = len(seq.fed)
        return seq.fed[lo:hi] + seq.tokens[max(lo - n, 0) : hi - n] if lo < n else seq.tokens[lo - n : hi - n]

    def _catch_up(self, rows: list[int]) -> None:
        """Read into the draft's cache the tokens of `rows` it has not read, but each row's newest
        (a new prompt, the tokens of plain steps), in one forward of the draft per run of rows."""
        b = self.batch
        for lo, z in adjacent_runs(rows):
            ids, mask = right_padded([self._unread(r)[:-1] for r in range(lo, z)], b.device)
            self.model(ids, cache=_RowView(self.cache, lo, z).known(self.length[lo:z]), return_hidden=True,
                       attention_mask=mask)
            self.length[lo:z] = b.length[lo:z]

    def _first(self, hi: int, start: int) -> torch.Tensor:
        """The draft's logits (hi, V) after each row's newest token, the few tokens before it the
        draft has not read (at most k + 1: after a round that kept every drafted token, the last of
        them; after plain steps, their tokens) read in the same forward."""
        b = self.batch
        gaps = [b.length[r] + 1 - self.length[r] if b.seqs[r] is not None else 1 for r in range(hi)]
        self.cache.lengths[:hi] = torch.tensor(self.length[:hi], device=b.device)
        if max(gaps) == 1:
            return self._draft_logits(b.last[:hi, 0], hi, start + 1)
        ids, _ = right_padded([self._unread(r) if b.seqs[r] is not None else [0] for r in range(hi)], b.device)
        logits = self.fast.verify(ids, self.cache, hi, max(self.length[:hi]) + ids.shape[1])
        at = torch.tensor([g - 1 for g in gaps], device=b.device)
        self.cache.lengths[:hi] += torch.tensor(gaps, device=b.device) * b.live[:hi]
        return logits[torch.arange(hi, device=b.device), at, : b.vocab].float()

    def _draft_logits(self, tokens: torch.Tensor, hi: int, used: int) -> torch.Tensor:
        """The draft's logits (hi, V) for one token per row at each row's length; advances live rows."""
        if self.fast.settings.cuda_graphs and self.fast.compiled:  # the graph reads a token for every cache row
            full = torch.zeros(self.cache.batch, dtype=torch.long, device=tokens.device)
            full[:hi] = tokens
            tokens = full
        logits = self.fast(tokens, self.cache, hi, used)
        self.cache.lengths[:hi] += self.batch.live[:hi]
        return logits[:, : self.batch.vocab].float()

    def step(self, hi: int) -> bool:
        """One speculative round for rows 0..hi-1, or False (nothing done) where a plain step is due."""
        b, k = self.batch, self.k
        seqs = b.seqs[:hi]
        running = [s for s in seqs if s is not None]
        if len(running) > MAX_ROWS or any(s.params.repetition_penalty != 1.0 for s in running):
            return False
        if max(b.length[:hi]) + k + 1 > self.max_len:
            return False
        if self.pace is not None and not self.pace.speculate(len(running)):
            return False
        far = [r for r in range(hi) if seqs[r] is not None and b.length[r] - self.length[r] > k]
        if far:  # a new prompt (or many plain steps): read by the draft's forward, as a prefill is
            self._catch_up(far)
        t0 = time.perf_counter()
        temperature, top_k, top_p = b.temperature[:hi], b.top_k[:hi], b.top_p[:hi]
        sampling = any(s.params.temperature > 0 for s in running)
        # draws in [0, 1) from each row's own generator: k for drafting, k for accepting, 1 for the last token
        draws = torch.tensor([[s.rng.random() if s is not None and s.params.temperature > 0 else 0.0
                               for _ in range(2 * k + 1)] for s in seqs], device=b.device) if sampling else None

        # 1. draft k tokens per row, one step each (the k-th is read by the draft at the next round, if kept)
        start = max(b.length[:hi])
        start_of = b.length[:hi]  # a copy: the draft reads each row's positions start_of[row] .. + k - 1
        ids = torch.empty(hi, k + 1, dtype=torch.long, device=b.device)  # the newest token, then the drafts
        ids[:, 0] = b.last[:hi, 0]
        q = []
        for i in range(k):
            logits = self._first(hi, start) if i == 0 else self._draft_logits(ids[:, i], hi, start + i + 1)
            if sampling:
                q.append(sampling_probs(logits, temperature, top_k, top_p))
                ids[:, i + 1] = sample_next(logits, temperature, top_k, top_p, uniform=draws[:, i], sampling=True)
            else:
                ids[:, i + 1] = logits.argmax(-1)
        drafted_ids = ids[:, 1:]  # (hi, k)

        # 2. the model's logits at all k + 1 positions, in one forward (the fused step over k + 1 tokens)
        logits = b.fast.verify(ids, b.cache, hi, start + k + 1)[:, :, : b.vocab].float()  # (hi, k + 1, V)

        # 3. how many drafted tokens each row keeps, and its own next token
        if sampling:
            p = sampling_probs(logits.reshape(hi * (k + 1), -1), temperature.repeat_interleave(k + 1),
                               top_k.repeat_interleave(k + 1), top_p.repeat_interleave(k + 1)).view(hi, k + 1, -1)
            n, token = accept(p, torch.stack(q, 1), drafted_ids, draws[:, k:])
        else:
            best = logits.argmax(-1)  # (hi, k + 1)
            n = (best[:, :k] == drafted_ids).long().cumprod(1).sum(1)
            token = best[torch.arange(hi), n]
        values = torch.cat([n, token, drafted_ids.reshape(-1)]).tolist()  # the round's one device read
        kept, tokens, drafts = values[:hi], values[hi : 2 * hi], values[2 * hi :]

        # 4. hand each row its tokens; rows that go on keep the cache positions of what they kept
        now = time.perf_counter()
        self.rounds += 1
        lengths, handed = [], b.handed
        for row in range(hi):
            seq = seqs[row]
            if seq is None:
                lengths.append(0)
                continue
            self.proposed += k
            self.accepted += kept[row]
            out = [*drafts[row * k : row * k + kept[row]], tokens[row]]
            going = all(b._give(row, t, now) for t in out)  # stops at the first token that ends it
            if going:
                b.length[row] += 1 + kept[row]
                b.last[row, 0] = tokens[row]
                self.length[row] = min(start_of[row] + k, b.length[row])  # through its last kept draft
            lengths.append(b.length[row])
        b.cache.lengths[:hi] = torch.tensor(lengths, device=b.device)
        if self.pace is not None:
            self.pace.round(len(running), b.handed - handed, time.perf_counter() - t0)
        return True
