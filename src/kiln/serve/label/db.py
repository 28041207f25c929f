"""The label database: pairs of completions, labellers, the order each saw a pair in, and votes.

One SQLite file in WAL mode with `synchronous=FULL`: every vote is its own committed transaction,
so a crash loses nothing that was acknowledged, and readers (report, export) never wait for a
writer. Every statement is parameterised. A labeller is known only by the SHA-256 of their token;
a vote is keyed by (labeller, pair), so a replayed or double-clicked vote counts once.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from urllib.parse import quote

from kiln.errors import KilnError
from kiln.runs import fsync_dir
from kiln.serve.label.agreement import cohen_kappa, fleiss_kappa

SCHEMA_VERSION = "1"
CHOICES = ("a", "b", "tie", "both_bad")  # what a vote says about the pair as stored
SIDES = ("left", "right", "tie", "both_bad")  # what the labeller picked on screen
NAME = re.compile(r"[\w.@+-][\w .@+-]{0,63}")

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE pairs (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,
    a TEXT NOT NULL,
    b TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    UNIQUE (prompt, a, b)
);
CREATE TABLE labellers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
-- A pair as shown to one labeller: its random order (swapped = b on the left) and when, which
-- holds the pair for them for label.lease_s.
CREATE TABLE assignments (
    labeller_id INTEGER NOT NULL REFERENCES labellers (id),
    pair_id INTEGER NOT NULL REFERENCES pairs (id),
    swapped INTEGER NOT NULL CHECK (swapped IN (0, 1)),
    shown REAL NOT NULL,
    PRIMARY KEY (labeller_id, pair_id)
);
CREATE INDEX assignments_by_pair ON assignments (pair_id);
CREATE TABLE votes (
    labeller_id INTEGER NOT NULL REFERENCES labellers (id),
    pair_id INTEGER NOT NULL REFERENCES pairs (id),
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
    swapped INTEGER NOT NULL CHECK (swapped IN (0, 1)),
    comment TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    PRIMARY KEY (labeller_id, pair_id)
);
CREATE INDEX votes_by_pair ON votes (pair_id);
"""

# Conditions on a pair `p.id` for labeller :me. Not theirs yet: they have not voted on it. Room:
# fewer than :per_pair votes plus other labellers' live holds (shown after :since, not voted on).
_NOT_MINE = "NOT EXISTS (SELECT 1 FROM votes v WHERE v.pair_id = p.id AND v.labeller_id = :me)"
_ROOM = """(SELECT COUNT(*) FROM votes v WHERE v.pair_id = p.id)
    + (SELECT COUNT(*) FROM assignments s
       WHERE s.pair_id = p.id AND s.labeller_id != :me AND s.shown > :since
         AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.pair_id = s.pair_id AND v.labeller_id = s.labeller_id))
    < :per_pair"""
_OPEN = f"{_NOT_MINE} AND {_ROOM}"


class LabelDBError(KilnError):
    """A label database problem; `status` is the HTTP status the labelling app answers with."""

    status = 500


class LabelDBBusy(LabelDBError):
    status = 503


class PairNotFound(LabelDBError):
    status = 404


class NotShown(LabelDBError):
    status = 403


class VoteConflict(LabelDBError):
    status = 409


class BadName(LabelDBError):
    status = 400


@dataclass(frozen=True)
class Labeller:
    id: int
    name: str


@dataclass(frozen=True)
class Shown:
    """A pair as one labeller sees it: the two completions in their order for that labeller."""

    pair_id: int
    prompt: str
    left: str
    right: str


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def to_choice(side: str, swapped: bool) -> str:
    """The stored choice ('a', 'b', ...) for the side picked on screen, given the labeller's order."""
    if side == "left":
        return "b" if swapped else "a"
    if side == "right":
        return "a" if swapped else "b"
    return side


def check_name(name: str) -> str:
    """A labeller's name, stripped, or a one-line error saying what a name may hold."""
    name = name.strip()
    if not NAME.fullmatch(name):
        raise BadName(f"labeller name {name!r} must be 1-64 letters, digits, spaces or . @ + - _; "
                      "write e.g. name=alice")
    return name


def majority(counts: Counter) -> str | None:
    """The choice more than half of a pair's votes agree on, if any."""
    total = sum(counts.values())
    for choice, n in counts.items():
        if 2 * n > total:
            return choice
    return None


class LabelDB:
    """An existing label database (checked on open). `create` makes a new one."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        if not self.path.is_file():
            raise LabelDBError(f"no label database at {self.path}; make one with `kiln label generate out=RUN` "
                               "or point label.db= at it")
        with self._connect() as con:
            try:
                row = con.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            except sqlite3.OperationalError as e:
                if "no such table" not in str(e):
                    raise
                row = None
            if row is None:
                raise LabelDBError(f"{self.path} is an SQLite file but not a kiln label database; "
                                   "point label.db= at a file made by `kiln label generate`")
            if row[0] != SCHEMA_VERSION:
                raise LabelDBError(f"{self.path} has label schema {row[0]!r}, this kiln reads {SCHEMA_VERSION!r}; "
                                   "use the kiln version that made it")
            self.secret = con.execute("SELECT value FROM meta WHERE key = 'secret'").fetchone()[0]

    @classmethod
    def create(cls, path: str | Path, busy_timeout_s: float = 5.0) -> LabelDB:
        """Open the database at `path`, making it first if there is none (whole or not at all)."""
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.unlink(missing_ok=True)
            con = sqlite3.connect(tmp)
            try:
                con.executescript(SCHEMA)
                con.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [
                    ("schema", SCHEMA_VERSION), ("secret", secrets.token_hex(32)), ("created", repr(time.time()))])
                con.commit()
                con.execute("PRAGMA journal_mode = WAL")
            finally:
                con.close()
            os.replace(tmp, path)
            fsync_dir(path.parent)
        return cls(path, busy_timeout_s)

    # ---- connections ---------------------------------------------------------------------------
    def _error(self, e: sqlite3.Error) -> LabelDBError:
        name = getattr(e, "sqlite_errorname", "")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return LabelDBBusy(f"the label database {self.path} is locked by another process "
                               f"(waited {self.busy_timeout_s:g} s); nothing was changed: try again when it is done, "
                               "or raise label.busy_timeout_s")
        if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            return LabelDBError(f"{self.path} is not a readable label database ({e}); nothing was changed: "
                                "restore it from a copy, or point label.db= at the right file")
        return LabelDBError(f"the label database {self.path} failed: {e}; nothing was changed")

    @contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction on a fresh connection (one per request: connections are not shared across
        threads). Writers take the write lock up front (BEGIN IMMEDIATE), waiting `busy_timeout_s`."""
        try:
            # mode=rw: never create a file here, even if the database was removed underneath a server.
            con = sqlite3.connect(f"file:{quote(str(self.path.resolve()))}?mode=rw", uri=True,
                                  timeout=self.busy_timeout_s, isolation_level=None)
        except sqlite3.Error as e:
            raise self._error(e) from None
        try:
            con.execute("PRAGMA synchronous = FULL")
            con.execute("PRAGMA foreign_keys = ON")
            con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield con
            con.execute("COMMIT")
        except sqlite3.Error as e:
            if con.in_transaction:
                con.rollback()
            raise self._error(e) from None
        except BaseException:
            if con.in_transaction:
                con.rollback()
            raise
        finally:
            con.close()

    def check(self) -> None:
        """Read every page (`PRAGMA quick_check`): a damaged file fails here, before anyone labels."""
        with self._connect() as con:
            problems = [r[0] for r in con.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise LabelDBError(f"{self.path} is damaged ({problems[0]}); nothing was changed: restore it from a copy")

    # ---- pairs and labellers -------------------------------------------------------------------
    def add_pairs(self, pairs: Iterable[tuple[str, str, str]], source: str = "") -> int:
        """Add (prompt, a, b) pairs in one transaction; returns how many were new."""
        now = time.time()
        with self._connect(write=True) as con:
            before = con.total_changes
            con.executemany("INSERT OR IGNORE INTO pairs (prompt, a, b, source, created) VALUES (?, ?, ?, ?, ?)",
                            [(p, a, b, source, now) for p, a, b in pairs])
            return con.total_changes - before

    def invite(self, name: str) -> str:
        """A new token for labeller `name` (made if new; an old token stops working). Returned once:
        only its hash is stored."""
        name = check_name(name)
        token = secrets.token_urlsafe(24)
        with self._connect(write=True) as con:
            con.execute("INSERT INTO labellers (name, token_sha256, created) VALUES (?, ?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET token_sha256 = excluded.token_sha256",
                        (name, token_hash(token), time.time()))
        return token

    def labeller(self, token: str) -> Labeller | None:
        with self._connect() as con:
            row = con.execute("SELECT id, name FROM labellers WHERE token_sha256 = ?", (token_hash(token),)).fetchone()
        return Labeller(*row) if row else None

    def counts(self) -> tuple[int, int, int]:
        """(pairs, labellers, votes)."""
        with self._connect() as con:
            return con.execute("SELECT (SELECT COUNT(*) FROM pairs), (SELECT COUNT(*) FROM labellers), "
                               "(SELECT COUNT(*) FROM votes)").fetchone()

    # ---- labelling -----------------------------------------------------------------------------
    def next_pair(self, who: Labeller, per_pair: int, lease_s: float) -> Shown | None:
        """The pair `who` should label now, held for them for `lease_s`: the one they were last
        shown and did not vote on (same order, so a reload changes nothing), else the first open
        pair (in id order, so with several labellers per pair each pair fills before the next), in
        a fresh random order. Both lookups stop at the first match: no scan of every pair."""
        now = time.time()
        args = {"me": who.id, "per_pair": per_pair, "since": now - lease_s}
        with self._connect(write=True) as con:
            row = con.execute("SELECT p.id, p.prompt, p.a, p.b FROM assignments m JOIN pairs p ON p.id = m.pair_id "
                              f"WHERE m.labeller_id = :me AND {_OPEN} ORDER BY m.shown DESC LIMIT 1", args).fetchone()
            if row is None:
                row = con.execute(f"SELECT p.id, p.prompt, p.a, p.b FROM pairs p WHERE {_OPEN} ORDER BY p.id LIMIT 1",
                                  args).fetchone()
            if row is None:
                return None
            pair_id, prompt, a, b = row
            con.execute("INSERT INTO assignments (labeller_id, pair_id, swapped, shown) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (labeller_id, pair_id) DO UPDATE SET shown = excluded.shown",
                        (who.id, pair_id, secrets.randbits(1), now))
            (swapped,) = con.execute("SELECT swapped FROM assignments WHERE labeller_id = ? AND pair_id = ?",
                                     (who.id, pair_id)).fetchone()
        return Shown(pair_id, prompt, *((b, a) if swapped else (a, b)))

    def vote(self, who: Labeller, pair_id: int, side: str, comment: str = "") -> bool:
        """Record `who`'s vote on a pair they were shown; False when the same vote was already there
        (a double click or a replayed request: counted once). A different second vote is refused."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}")
        with self._connect(write=True) as con:
            if con.execute("SELECT 1 FROM pairs WHERE id = ?", (pair_id,)).fetchone() is None:
                raise PairNotFound(f"pair {pair_id} does not exist; reload the page for your next pair")
            shown = con.execute("SELECT swapped FROM assignments WHERE labeller_id = ? AND pair_id = ?",
                                (who.id, pair_id)).fetchone()
            if shown is None:
                raise NotShown(f"pair {pair_id} was not shown to {who.name}; reload the page for your next pair")
            choice = to_choice(side, bool(shown[0]))
            before = con.execute("SELECT choice FROM votes WHERE labeller_id = ? AND pair_id = ?",
                                 (who.id, pair_id)).fetchone()
            if before is not None:
                if before[0] == choice:
                    return False
                raise VoteConflict(f"{who.name} already voted on pair {pair_id}; a vote cannot be changed")
            con.execute("INSERT INTO votes (labeller_id, pair_id, choice, swapped, comment, created) "
                        "VALUES (?, ?, ?, ?, ?, ?)", (who.id, pair_id, choice, shown[0], comment, time.time()))
        return True

    def progress(self, who: Labeller, per_pair: int, lease_s: float) -> dict:
        """What `who` has done and has left, and the whole job's votes against its target."""
        args = {"me": who.id, "per_pair": per_pair, "since": time.time() - lease_s}
        with self._connect() as con:
            done = con.execute("SELECT COUNT(*) FROM votes WHERE labeller_id = ?", (who.id,)).fetchone()[0]
            pairs = con.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
            # Open = all pairs less theirs less those full without them; only pairs with a vote or a
            # live hold can be full, so only those are looked at.
            full = con.execute("SELECT COUNT(*) FROM (SELECT pair_id AS id FROM votes UNION "
                               "SELECT pair_id FROM assignments WHERE shown > :since) AS p "
                               f"WHERE {_NOT_MINE} AND NOT ({_ROOM})", args).fetchone()[0]
            left = pairs - done - full
            # Votes towards the target: a pair's votes beyond per_pair do not count twice.
            votes = con.execute("SELECT COALESCE(SUM(MIN(n, ?)), 0) FROM "
                                "(SELECT COUNT(*) AS n FROM votes GROUP BY pair_id)", (per_pair,)).fetchone()[0]
        return {"done": done, "left": left, "votes": votes, "target": pairs * per_pair}

    # ---- results -------------------------------------------------------------------------------
    def _pairs_with_votes(self, con: sqlite3.Connection) -> dict[int, dict]:
        rows = con.execute("SELECT p.id, p.prompt, p.a, p.b, l.name, v.choice, v.swapped FROM pairs p "
                           "LEFT JOIN votes v ON v.pair_id = p.id LEFT JOIN labellers l ON l.id = v.labeller_id "
                           "ORDER BY p.id, l.name").fetchall()
        pairs: dict[int, dict] = {}
        for pid, prompt, a, b, name, choice, swapped in rows:
            pair = pairs.setdefault(pid, {"prompt": prompt, "a": a, "b": b, "votes": []})
            if choice is not None:
                pair["votes"].append((name, choice, bool(swapped)))
        return pairs

    def preferences(self) -> list[dict]:
        """TRL's preference records, {prompt, chosen, rejected}, for every pair whose votes have a
        strict majority for one completion (ties, 'both bad' and split votes give none)."""
        with self._connect() as con:
            pairs = self._pairs_with_votes(con)
        out = []
        for pair in pairs.values():
            winner = majority(Counter(c for _, c, _ in pair["votes"]))
            if winner in ("a", "b"):
                loser = "b" if winner == "a" else "a"
                out.append({"prompt": pair["prompt"], "chosen": pair[winner], "rejected": pair[loser]})
        return out

    def report(self, per_pair: int) -> dict:
        """Progress, per-labeller counts, outcomes, agreement (Fleiss' kappa over pairs with two or
        more votes, Cohen's per couple of labellers) and position bias (how often the left side won)."""
        with self._connect() as con:
            pairs = self._pairs_with_votes(con)
            names = [r[0] for r in con.execute("SELECT name FROM labellers ORDER BY name")]
        per_labeller: Counter = Counter({n: 0 for n in names})
        outcomes: Counter = Counter({"preference": 0, "tie": 0, "both_bad": 0, "split": 0})
        by_labeller: dict[str, dict[int, str]] = defaultdict(dict)
        left = decisive = 0
        for pid, pair in pairs.items():
            votes = pair["votes"]
            for name, choice, swapped in votes:
                per_labeller[name] += 1
                by_labeller[name][pid] = choice
                if choice in ("a", "b"):
                    decisive += 1
                    left += (choice == "a") != swapped
            if votes:
                winner = majority(Counter(c for _, c, _ in votes))
                outcomes["preference" if winner in ("a", "b") else winner or "split"] += 1
        multi = [Counter(c for _, c, _ in p["votes"]) for p in pairs.values() if len(p["votes"]) >= 2]
        cohen = []
        for x, y in combinations(sorted(by_labeller), 2):
            shared = sorted(set(by_labeller[x]) & set(by_labeller[y]))
            if shared:
                kappa = cohen_kappa([by_labeller[x][i] for i in shared], [by_labeller[y][i] for i in shared])
                cohen.append({"labellers": [x, y], "pairs": len(shared), "kappa": kappa})
        return {
            "pairs": len(pairs),
            "labellers_per_pair": per_pair,
            "votes": sum(per_labeller.values()),
            "complete": sum(len(p["votes"]) >= per_pair for p in pairs.values()),
            "unlabelled": sum(not p["votes"] for p in pairs.values()),
            "labellers": dict(per_labeller),
            "outcomes": dict(outcomes),
            "left_share": left / decisive if decisive else None,
            "decisive_votes": decisive,
            "fleiss_kappa": fleiss_kappa(multi),
            "fleiss_pairs": len(multi),
            "cohen_kappa": cohen,
        }


def _kappa(k: float | None) -> str:
    return "n/a (every vote the same)" if k is None else f"{k:.3f}"


def format_report(r: dict) -> str:
    """The report as lines for a terminal or report.md."""
    lines = [
        f"pairs: {r['pairs']}, votes: {r['votes']}, complete (≥ {r['labellers_per_pair']} votes): "
        f"{r['complete']}, unlabelled: {r['unlabelled']}",
        "labellers: " + (", ".join(f"{n} {c}" for n, c in r["labellers"].items()) or "none yet"),
        "outcomes (strict majority): " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in r["outcomes"].items()),
    ]
    if r["left_share"] is not None:
        lines.append(f"position bias: the left completion won {100 * r['left_share']:.0f}% of "
                     f"{r['decisive_votes']} decisive votes (50% = none; order is random per labeller)")
    if r["fleiss_pairs"]:
        lines.append(f"agreement: Fleiss' kappa {_kappa(r['fleiss_kappa'])} over {r['fleiss_pairs']} pairs "
                     "with 2+ votes")
        lines += [f"  Cohen's kappa {x} / {y}: {_kappa(c['kappa'])} over {c['pairs']} pairs"
                  for c in r["cohen_kappa"] for x, y in [c["labellers"]]]
    else:
        lines.append("agreement: no pair has two votes yet (set label.labellers_per_pair=2 or more)")
    return "\n".join(lines)
