"""The labelling app: its database, its HTTP API (in process), its security, bad input, and the CLI.

The real-browser test is tests/test_label_browser.py; generation from a trained model is the one
slow-ish test here (a 2-step tiny model).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter

import pytest
from fastapi.testclient import TestClient

from conftest import TINY_TRAIN, kiln
from kiln.data.preference_data import PairStats, read_pairs
from kiln.serve.label.agreement import cohen_kappa, fleiss_kappa
from kiln.serve.label.app import make_app
from kiln.serve.label.db import LabelDB

ADMIN = "admin-key-for-tests-0123456789"
PAIRS = [("def add(a, b):", " return a + b", " return a - b"),
         ("class Stack:", " pass", " def push(self, x): ..."),
         ("import os\n", "print(os.getcwd())", "os.remove('/')")]


@pytest.fixture
def db(tmp_path) -> LabelDB:
    d = LabelDB.create(tmp_path / "labels" / "labels.db")
    assert d.add_pairs(PAIRS) == 3
    assert d.add_pairs(PAIRS[:2]) == 0  # generating the same samples again adds nothing twice
    return d


def client_for(db: LabelDB, token: str | None = None, per_pair: int = 2, **kw) -> TestClient:
    c = TestClient(make_app(db, admin_key=ADMIN, per_pair=per_pair, **kw))
    if token is not None:
        r = c.post("/api/session", json={"token": token})
        assert r.status_code == 200, r.text
    return c


def vote(c: TestClient, pair_id: int, choice: str, csrf: str | None = None, **extra):
    if csrf is None:
        csrf = c.get("/api/next").json()["csrf"]
    return c.post("/api/vote", json={"pair_id": pair_id, "choice": choice, **extra}, headers={"X-CSRF-Token": csrf})


def label_all(c: TestClient, pick) -> list[dict]:
    """Label every pair this labeller is offered: `pick(pair) -> side`. Returns the pairs as shown."""
    seen = []
    while (nxt := c.get("/api/next").json())["pair"] is not None:
        pair = nxt["pair"]
        r = vote(c, pair["id"], pick(pair), nxt["csrf"])
        assert r.status_code == 200 and r.json()["recorded"], r.text
        seen.append(pair)
    return seen


def stored_votes(db: LabelDB) -> list[tuple]:
    with sqlite3.connect(db.path) as con:
        return con.execute("SELECT l.name, v.pair_id, v.choice FROM votes v JOIN labellers l ON l.id = v.labeller_id "
                           "ORDER BY l.name, v.pair_id").fetchall()


def one_line_error(r) -> str:
    message = r.json()["error"]
    assert "\n" not in message and "Traceback" not in message
    return message


# ---- agreement --------------------------------------------------------------------------------
def test_cohen_kappa_matches_the_textbook_example():
    # 50 items: both yes 20, yes/no 5, no/yes 10, both no 15: p_o = 0.7, p_e = 0.5, kappa = 0.4.
    first = ["yes"] * 25 + ["no"] * 25
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(["a", "b", "a"], ["a", "b", "a"]) == pytest.approx(1.0)
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None  # one category only: undefined


def test_fleiss_kappa_matches_the_textbook_example():
    # Fleiss (1971) as tabulated on Wikipedia: 10 subjects, 14 raters, 5 categories, kappa = 0.210.
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    items = [{k: n for k, n in enumerate(row) if n} for row in table]
    assert fleiss_kappa(items) == pytest.approx(0.2099, abs=5e-4)
    assert fleiss_kappa([{"a": 3}, {"b": 3}]) == pytest.approx(1.0)
    assert fleiss_kappa([{"a": 1}]) is None  # no item with two labels


# ---- labelling over HTTP ----------------------------------------------------------------------
def test_two_labellers_label_every_pair_and_export_follows_their_picks(db, tmp_path, capsys):
    alice, bob = db.invite("alice"), db.invite("bob")
    a, b = client_for(db, alice), client_for(db, bob)
    first = a.get("/api/next").json()
    assert first["name"] == "alice" and first["progress"] == {"done": 0, "left": 3, "votes": 0, "target": 6}
    # Both prefer the completion that keeps the files (the first listed); alice ties on pair 2.
    good = {p[1] for p in PAIRS}

    def keeper(pair):
        return "left" if pair["left"] in good else "right"

    seen_a = label_all(a, lambda p: "tie" if p["prompt"] == "class Stack:" else keeper(p))
    seen_b = label_all(b, keeper)
    assert len(seen_a) == len(seen_b) == 3
    assert a.get("/api/next").json()["progress"] == {"done": 3, "left": 0, "votes": 6, "target": 6}
    assert kiln("label", "export", f"label.db={db.path}", "label.labellers_per_pair=2") == 0
    rows = [json.loads(x) for x in (db.path.parent / "preferences.jsonl").read_text().splitlines()]
    # Pair 2 has a tie and a vote for one side: no strict majority, so it is left out.
    assert rows == [{"prompt": p, "chosen": good_, "rejected": bad} for p, good_, bad in (PAIRS[0], PAIRS[2])]
    out = capsys.readouterr().out
    assert "2 preference pairs written" in out and "Cohen's kappa alice / bob" in out
    stats = PairStats()  # the reader `kiln reward` and `kiln dpo` use takes every row
    read = read_pairs(db.path.parent / "preferences.jsonl", stats, strict=True)
    assert [r["chosen"] for r in read] == [[{"role": "assistant", "content": PAIRS[i][1]}] for i in (0, 2)]
    assert stats.rows == 2 and not stats.skipped


def test_each_labeller_sees_a_random_order_that_a_reload_keeps(db):
    orders = Counter()
    for i in range(20):
        who = db.labeller(db.invite(f"l{i}"))
        shown = db.next_pair(who, per_pair=20, lease_s=600)
        assert db.next_pair(who, per_pair=20, lease_s=600) == shown  # a reload: same pair, same order
        orders[shown.left] += 1
    assert shown.pair_id == 1 and set(orders) == {PAIRS[0][1], PAIRS[0][2]}  # both orders occur (p = 1 - 2^-19)


def test_a_shown_pair_is_held_for_its_labeller_until_the_lease_ends(db):
    x, y, z = (db.labeller(db.invite(n)) for n in "xyz")
    assert db.next_pair(x, per_pair=1, lease_s=600).pair_id == 1
    assert db.next_pair(y, per_pair=1, lease_s=600).pair_id == 2  # pair 1 is on x's screen
    time.sleep(0.05)
    assert db.next_pair(z, per_pair=1, lease_s=0.01).pair_id == 1  # x's hold has lapsed
    assert db.vote(x, 1, "left") is True  # a late vote is still kept: nothing a labeller did is lost
    assert db.next_pair(y, per_pair=1, lease_s=600).pair_id == 2


def test_a_pair_goes_to_as_many_labellers_as_configured(db):
    """per_pair=1: three labellers working at once never get the same pair (it is held while shown)."""
    d = LabelDB.create(db.path.parent / "many.db")
    d.add_pairs([(f"prompt {i}", f"a{i}", f"b{i}") for i in range(12)])
    errors = []

    def work(name):
        try:
            label_all(client_for(d, d.invite(name), per_pair=1), lambda p: "left")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in ("x", "y", "z")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    votes = stored_votes(d)
    assert len(votes) == 12 and len({pid for _, pid, _ in votes}) == 12


def test_a_vote_posted_twice_counts_once(db):
    c = client_for(db, db.invite("alice"))
    nxt = c.get("/api/next").json()
    first = vote(c, nxt["pair"]["id"], "left", nxt["csrf"])
    again = vote(c, nxt["pair"]["id"], "left", nxt["csrf"])  # a double click or a replayed request
    assert first.json()["recorded"] is True and again.status_code == 200 and again.json()["recorded"] is False
    changed = vote(c, nxt["pair"]["id"], "right", nxt["csrf"])
    assert changed.status_code == 409 and "already voted" in one_line_error(changed)
    assert len(stored_votes(db)) == 1 and again.json()["progress"]["done"] == 1


def test_a_vote_for_a_pair_that_does_not_exist_or_was_not_shown(db):
    c = client_for(db, db.invite("alice"))
    csrf = c.get("/api/next").json()["csrf"]  # shows pair 1
    missing = vote(c, 999, "left", csrf)
    assert missing.status_code == 404 and one_line_error(missing).startswith("pair 999 does not exist")
    unseen = vote(c, 3, "left", csrf)
    assert unseen.status_code == 403 and "was not shown to alice" in one_line_error(unseen)
    garbled = vote(c, "three", "left", csrf)
    assert garbled.status_code == 422 and one_line_error(garbled).startswith("bad request: pair_id")
    assert stored_votes(db) == []


def test_a_bad_token_gets_nothing(db):
    token = db.invite("alice")
    c = client_for(db)
    bad = c.post("/api/session", json={"token": "not-a-token"})
    assert bad.status_code == 401 and "not valid" in one_line_error(bad)
    assert c.get("/api/next").status_code == 401  # no cookie
    c.cookies.set("kiln_label", "forged")
    assert c.get("/api/next").status_code == 401
    old = client_for(db, token)
    db.invite("alice")  # renewing a link revokes the old one
    r = old.get("/api/next")
    assert r.status_code == 401 and "invite link" in one_line_error(r)


def test_a_labeller_votes_only_as_themselves_and_reads_no_one_elses_votes(db):
    alice, bob = client_for(db, db.invite("alice")), client_for(db, db.invite("bob"))
    nxt = alice.get("/api/next").json()
    impostor = vote(alice, nxt["pair"]["id"], "left", nxt["csrf"], labeller="bob")
    assert impostor.status_code == 422 and stored_votes(db) == []
    assert vote(alice, nxt["pair"]["id"], "left", nxt["csrf"]).status_code == 200
    assert "votes" not in json.dumps(bob.get("/api/next").json()["pair"])
    for path in ("/api/admin/report", "/api/admin/export"):
        assert bob.get(path).status_code == 401  # a labeller cookie is not the admin key
        assert bob.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert bob.get(path, headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    assert bob.post("/api/admin/invite", json={"name": "eve"}).status_code == 401
    report = bob.get("/api/admin/report", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert report["labellers"] == {"alice": 1, "bob": 0}


def test_votes_need_the_csrf_token_and_the_same_origin(db):
    alice = client_for(db, db.invite("alice"))
    other_csrf = client_for(db, db.invite("bob")).get("/api/next").json()["csrf"]
    pid = alice.get("/api/next").json()["pair"]["id"]
    assert vote(alice, pid, "left", "").status_code == 403
    assert vote(alice, pid, "left", other_csrf).status_code == 403
    csrf = alice.get("/api/next").json()["csrf"]
    body = {"pair_id": pid, "choice": "left"}
    cross = alice.post("/api/vote", json=body, headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"})
    assert cross.status_code == 403 and "cross-site" in one_line_error(cross)
    fetch = alice.post("/api/vote", json=body, headers={"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"})
    assert fetch.status_code == 403
    assert stored_votes(db) == []
    same = alice.post("/api/vote", json=body, headers={"X-CSRF-Token": csrf, "Origin": "http://testserver"})
    assert same.status_code == 200


def test_pages_carry_a_strict_content_security_policy_and_a_loopback_server_checks_the_host(db):
    c = client_for(db)
    page = c.get("/")
    assert page.status_code == 200 and "label.js" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert c.get("/static/label.js").headers["content-type"].startswith("text/javascript")
    assert c.get("/static/../db.py").status_code == 404
    guarded = client_for(db, allowed_hosts=["127.0.0.1", "localhost"])
    assert guarded.get("/").status_code == 400  # Host: testserver, as a rebinding DNS name would be


def test_admin_can_invite_from_the_web(db):
    c = client_for(db, base_url="http://127.0.0.1:9999")
    r = c.post("/api/admin/invite", json={"name": "carol"}, headers={"Authorization": f"Bearer {ADMIN}"})
    link = r.json()["link"]
    assert link.startswith("http://127.0.0.1:9999/#join=")
    assert db.labeller(link.split("#join=")[1]).name == "carol"
    bad = c.post("/api/admin/invite", json={"name": "<b>x</b>"}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert bad.status_code == 400 and "labeller name" in one_line_error(bad)


# ---- a locked or damaged database -------------------------------------------------------------
def test_a_locked_database_answers_busy_and_loses_nothing(tmp_path, capsys):
    d = LabelDB.create(tmp_path / "labels.db", busy_timeout_s=0.2)
    d.add_pairs(PAIRS)
    c = client_for(d, d.invite("alice"), per_pair=1)
    label_one = c.get("/api/next").json()
    assert vote(c, label_one["pair"]["id"], "left", label_one["csrf"]).status_code == 200
    nxt = c.get("/api/next").json()
    lock = sqlite3.connect(d.path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        busy = vote(c, nxt["pair"]["id"], "right", nxt["csrf"])
        assert busy.status_code == 503 and "is locked by another process" in one_line_error(busy)
        assert kiln("label", "invite", f"label.db={d.path}", "name=bob", "label.busy_timeout_s=0.2") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is locked by another process" in err[0]
        assert kiln("label", "report", f"label.db={d.path}") == 0  # readers are not blocked (WAL)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert vote(c, nxt["pair"]["id"], "right", nxt["csrf"]).json()["recorded"] is True  # the retry goes through
    assert [pid for _, pid, _ in stored_votes(d)] == sorted([label_one["pair"]["id"], nxt["pair"]["id"]])


@pytest.mark.parametrize("content", [b"this is not a database at all" * 100, b""], ids=["garbage", "empty"])
@pytest.mark.parametrize("mode", ["serve", "export", "report", "invite", "generate"])
def test_a_damaged_database_is_one_line_and_left_as_it_is(tmp_path, capsys, mode, content):
    path = tmp_path / "labels.db"
    path.write_bytes(content)
    assert kiln("label", mode, f"out={tmp_path / 'run'}", f"label.db={path}", "name=alice", "label.port=0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kiln label: error: {path}"), err
    assert "label database" in err[0]
    assert path.read_bytes() == content  # nothing written over it
    assert not (tmp_path / "run").exists()


def test_an_sqlite_file_of_something_else_is_refused(tmp_path, capsys):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE t (x)")
    assert kiln("label", "report", f"label.db={path}") == 2
    assert "is an SQLite file but not a kiln label database" in capsys.readouterr().err


def test_no_database_yet_says_how_to_make_one(tmp_path, capsys):
    assert kiln("label", "serve", f"out={tmp_path}", "label.port=0") == 2
    assert "make one with `kiln label generate" in capsys.readouterr().err
    assert not (tmp_path / "labels").exists()


# ---- export and report ------------------------------------------------------------------------
def test_export_keeps_strict_majorities_only(tmp_path, capsys):
    d = LabelDB.create(tmp_path / "labels.db")
    d.add_pairs([(f"p{i}", f"a{i}", f"b{i}") for i in range(5)])
    # votes per pair, as stored choices: a majority for a, for b, a split, a tie majority, both bad
    plan = {1: "aab", 2: "bba", 3: "ab", 4: ["tie", "tie", "a"], 5: ["both_bad", "b", "both_bad"]}
    names = ["u", "v", "w"]
    people = {n: d.labeller(d.invite(n)) for n in names}
    for pid, choices in plan.items():
        for name, choice in zip(names, choices):
            with sqlite3.connect(d.path) as con:  # votes as stored, to test aggregation alone
                con.execute("INSERT INTO votes VALUES (?, ?, ?, 0, '', 0)", (people[name].id, pid, choice))
    assert d.preferences() == [{"prompt": "p0", "chosen": "a0", "rejected": "b0"},
                               {"prompt": "p1", "chosen": "b1", "rejected": "a1"}]
    r = d.report(per_pair=3)
    assert r["outcomes"] == {"preference": 2, "tie": 1, "both_bad": 1, "split": 1}
    assert r["complete"] == 4 and r["fleiss_pairs"] == 5
    # u: a b a tie both_bad; v: a b b tie b; w: b a - a both_bad. Cohen u/v over 5 shared pairs:
    # agree on 3 of 5 (p_o 0.6); u: a2 b1 tie1 bb1, v: a1 b3 tie1 -> p_e = (2*1 + 1*3 + 1*1) / 25 = 0.24.
    uv = next(c for c in r["cohen_kappa"] if c["labellers"] == ["u", "v"])
    assert uv["pairs"] == 5 and uv["kappa"] == pytest.approx((0.6 - 0.24) / (1 - 0.24))


def test_export_with_nothing_decided_writes_nothing(db, capsys):
    out = db.path.parent / "prefs.jsonl"
    assert kiln("label", "export", f"label.db={db.path}", f"label.output={out}") == 2
    assert "no pair has a majority preference yet" in capsys.readouterr().err
    assert not out.exists()


def test_position_bias_is_reported(db):
    c = client_for(db, db.invite("alice"), per_pair=1)
    label_all(c, lambda p: "left")
    r = db.report(per_pair=1)
    assert r["left_share"] == 1.0 and r["decisive_votes"] == 3


# ---- the CLI ----------------------------------------------------------------------------------
def test_invite_prints_a_link_whose_token_only_the_labeller_has(tmp_path, capsys):
    assert kiln("label", "invite", f"out={tmp_path}", "name=dana", "label.port=9000") == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("invite dana: "))
    token = line.split("#join=")[1]
    d = LabelDB(tmp_path / "labels" / "labels.db")
    assert d.labeller(token).name == "dana" and line.startswith("invite dana: http://127.0.0.1:9000/#join=")
    with sqlite3.connect(d.path) as con:
        assert token not in json.dumps(con.execute("SELECT * FROM labellers").fetchall())  # stored hashed
    assert kiln("label", "invite", f"out={tmp_path}", "name=<script>") == 2
    assert kiln("label", "invite", f"out={tmp_path}") == 2


def test_serve_binds_elsewhere_only_with_an_admin_key(db, capsys):
    assert kiln("label", "serve", f"label.db={db.path}", "label.host=0.0.0.0", "label.port=0") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "set label.admin_key" in err
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        assert kiln("label", "serve", f"label.db={db.path}", f"label.port={taken.getsockname()[1]}") == 2
        assert "is in use" in capsys.readouterr().err
    finally:
        taken.close()


def test_generate_samples_pairs_from_a_trained_model(run_dir, tmp_path, capsys):
    assert kiln("label", "generate", f"out={run_dir}", "sample.temperature=0") == 2
    assert "sample.temperature=0" in capsys.readouterr().err
    assert kiln("pretrain", f"out={run_dir}", *TINY_TRAIN, "train.max_steps=2") == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def f(x):"}\n\n{"prompt": "import sys\\n"}\n')
    args = ["label", "generate", f"out={run_dir}", f"label.prompts={prompts}", "label.pairs_per_prompt=2",
            "sample.max_new_tokens=8", "labellers=alice,bob"]
    capsys.readouterr()
    assert kiln(*args) == 0
    out = capsys.readouterr().out
    assert out.count("#join=") == 2 and "4 new pairs" in out and "plain continuations" in out  # a pretrain run
    d = LabelDB(run_dir / "labels" / "labels.db")

    def pairs():
        with sqlite3.connect(d.path) as con:
            return con.execute("SELECT prompt, a, b, source FROM pairs ORDER BY id").fetchall()

    assert [r[0] for r in pairs()] == ["def f(x):", "def f(x):", "import sys\n", "import sys\n"]
    assert all(a != b and a and b for _, a, b, _ in pairs())
    assert kiln(*args, "label.chat=on") == 0  # the prompt as a user turn: other completions
    assert "4 new pairs" in capsys.readouterr().out
    assert [json.loads(r[3])["chat"] for r in pairs()] == [False] * 4 + [True] * 4
    for bad, why in (('{"text": "x"}\n', f"{prompts}:1 has no \"prompt\" string"),
                     ('{"prompt": "a <|end|> b"}\n', "prompt 1 holds the special token <|end|>")):
        prompts.write_text(bad)
        assert kiln(*args, "label.chat=on") == 2
        assert why in capsys.readouterr().err
    assert kiln(*args[:-1], "labellers=<b>") == 2
    assert "labeller name '<b>'" in capsys.readouterr().err
    assert d.counts() == (8, 2, 0)


def test_pairs_with_an_empty_reply_are_neither_labelled_nor_exported(tmp_path, capsys, monkeypatch):
    """An empty (or blank) sample gives labellers nothing to compare and kiln dpo refuses it: `label
    generate` leaves such pairs out as it does identical ones, and `label export` drops any a
    database already holds."""
    import types

    from kiln.infer.generate import Engine

    replies = iter([["", "x = 1"], [" ", "y"], ["a", "b"], ["c", "c"]])
    monkeypatch.setattr(Engine, "from_run", classmethod(lambda cls, *a, **k: types.SimpleNamespace(
        generate=lambda context, sc, chat=False: next(replies))))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def f(x):"}\n{"prompt": "import os"}\n')
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # a run to `kiln.cli`'s check of out=; the engine above stands in
    assert kiln("label", "generate", f"out={run}", f"label.prompts={prompts}", "label.pairs_per_prompt=2") == 0
    out = capsys.readouterr().out
    assert "1 new pairs" in out and "2 samples gave an empty completion and were left out" in out
    assert "1 samples gave two identical completions" in out

    d = LabelDB.create(tmp_path / "old.db")  # a database from before that rule
    d.add_pairs([("p0", "a0", ""), ("p1", "  ", "b1"), ("p2", "a2", "b2")])
    people = [d.labeller(d.invite(n)) for n in ("u", "v", "w")]
    with sqlite3.connect(d.path) as con:
        for person in people:
            for pid in (1, 2, 3):
                con.execute("INSERT INTO votes VALUES (?, ?, ?, 0, '', 0)", (person.id, pid, "a"))
    target = tmp_path / "prefs.jsonl"
    assert kiln("label", "export", f"label.db={d.path}", f"label.output={target}") == 0
    assert [json.loads(line) for line in target.read_text().splitlines()] == [
        {"prompt": "p2", "chosen": "a2", "rejected": "b2"}]
    assert "2 with an empty reply left out" in capsys.readouterr().out
