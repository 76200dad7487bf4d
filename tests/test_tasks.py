"""Checks of the committed multi-task benchmark set (tasks/heldout.jsonl) and of the builder's text helpers.
No network and no downloads: the builder's corpus is not loaded here."""
import json
import os
import random
import re
import sys
from collections import Counter

import pytest

TASKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks")
sys.path.insert(0, TASKS)
import build_tasks  # noqa: E402
import task_text as tt  # noqa: E402

HELDOUT = os.path.join(TASKS, "heldout.jsonl")
TRAIN = os.path.join(os.path.dirname(TASKS), "runs", "tasks_train.jsonl")


@pytest.fixture(scope="module")
def heldout():
    with open(HELDOUT, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_heldout_has_20_prompts_per_family(heldout):
    assert Counter(r["task"] for r in heldout) == {f: 20 for f in build_tasks.FAMILIES}


def test_heldout_rows_have_the_documented_fields(heldout):
    ids = [r["id"] for r in heldout]
    assert len(set(ids)) == len(ids) == 160
    for r in heldout:
        assert set(r) == {"id", "task", "prompt", "source", "licence", "prompt_tokens"}
        assert re.fullmatch(rf"{r['task']}-\d\d", r["id"])
        assert isinstance(r["prompt_tokens"], int) and r["prompt"].strip() and r["source"] and r["licence"]
    assert len({r["prompt"] for r in heldout}) == 160


def test_heldout_token_counts_are_in_each_family_range(heldout):
    for r in heldout:
        lo, hi = build_tasks.TOKEN_RANGES[r["task"]]
        assert lo <= r["prompt_tokens"] <= hi, (r["id"], r["prompt_tokens"])
    summaries = [r["prompt_tokens"] for r in heldout if r["task"] == "summarization"]
    assert min(summaries) >= 500 and max(summaries) <= 2100


def test_heldout_text_is_free_of_markup(heldout):
    for r in heldout:
        if r["task"].startswith("code"):
            assert "```python\n" in r["prompt"]
            continue
        p = r["prompt"]
        assert not re.search(r"\\f[BIRP(\[]|\\\(|^\.(TP|PP|SH|IP|B|I|BR)\b", p, re.M), r["id"]
        assert not re.search(r"\]\(https?://|\[\s*\]\(|<(a|img|div|br)\b", p), r["id"]


def test_heldout_documents_are_all_in_heldout_buckets(heldout):
    heldout_math = set(tt.math_templates("heldout"))
    for r in heldout:
        for doc in build_tasks.doc_ids_from_source(r["source"]):
            if doc.startswith("math:"):
                assert doc[5:] in heldout_math
            else:
                assert build_tasks.split_of(doc) == "heldout", (r["id"], doc)


def test_math_template_sets_are_disjoint_and_give_whole_answers():
    assert not set(tt.MATH_HELDOUT) & set(tt.MATH_TRAIN)
    assert len(tt.MATH_HELDOUT) + len(tt.MATH_TRAIN) >= 15
    rng = random.Random(0)
    for make in list(tt.MATH_HELDOUT.values()) + list(tt.MATH_TRAIN.values()):
        for _ in range(200):
            question, answer = make(rng)
            assert isinstance(answer, int) and answer > 0, question


@pytest.mark.skipif(not os.path.exists(TRAIN), reason="no runs/tasks_train.jsonl (build it with --split train)")
def test_train_split_shares_no_document_with_heldout(heldout):
    held = set().union(*(build_tasks.doc_ids_from_source(r["source"]) for r in heldout))
    with open(TRAIN, encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            assert not build_tasks.doc_ids_from_source(r["source"]) & held, r["id"]


def test_troff_is_rendered_as_plain_text():
    page = tt.parse_man('.TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH DESCRIPTION\n'
                        'List information about the \\fIFILE\\fPs (the current directory by default).\n'
                        '.TP\n\\fB\\-a\\fR, \\fB\\-\\-all\\fR\ndo not ignore entries starting with .\n'
                        '.TP\n.B \\-A\ndo not list implied \\(aq.\\(aq and ..\n.PP\nExit status is 0.\n')
    assert page.title == "ls - list directory contents"
    blocks = dict(page.sections)["DESCRIPTION"]
    assert blocks[0] == ("para", "List information about the FILEs (the current directory by default).")
    assert blocks[1] == ("item", "-a, --all", "do not ignore entries starting with .")
    assert blocks[2] == ("item", "-A", "do not list implied '.' and ..")


def test_readme_cleaning_drops_badges_links_and_html():
    md = ('# tool\n\n[![PyPI](https://img.shields.io/x.svg)](https://pypi.org/p/tool)\n\n'
          'See [the docs](https://tool.example/docs) for <b>more</b>.\n')
    assert tt.clean_readme(md, "text/markdown") == "# tool\n\nSee the docs for more."
    rst = 'tool\n====\n\n.. image:: https://x/badge.svg\n\nRead `the docs <https://x>`_ and ``tool.run()``.\n'
    assert tt.clean_readme(rst, "text/x-rst") == "tool\n\nRead the docs and `tool.run()`."


def test_licence_names_become_spdx():
    assert tt.spdx("GPL-3+") == "GPL-3.0-or-later"
    assert tt.spdx("GPL-2") == "GPL-2.0-only"
    assert tt.spdx("GFDL-NIV-1.3+") == "GFDL-1.3-no-invariants-or-later"
    assert tt.spdx("Expat") == "MIT"
    assert tt.spdx("GPL-3+ or Less") == "GPL-3.0-or-later OR LicenseRef-Less"


def test_seed_is_for_the_train_split_only(capsys):
    assert build_tasks.parse_args(["--split", "train", "--seed", "3", "--out", "x.jsonl"]).seed == 3
    with pytest.raises(SystemExit):
        build_tasks.parse_args(["--split", "heldout", "--seed", "3", "--out", "x.jsonl"])
    assert "train split only" in capsys.readouterr().err


def test_mix_changes_only_the_families_named_and_refuses_mistakes(capsys):
    args = build_tasks.parse_args(["--split", "train", "--n", "100", "--mix", "translation=0.5,chat=0", "--out", "x.jsonl"])
    assert args.mix == build_tasks.TRAIN_MIX | {"translation": 0.5, "chat": 0.0}
    counts = build_tasks.quota(100, args.mix)
    assert counts["chat"] == 0 and counts["translation"] == max(counts.values()) and sum(counts.values()) == 100
    assert build_tasks.parse_args(["--split", "train", "--out", "x.jsonl"]).mix == build_tasks.TRAIN_MIX
    for mix in ("poetry=1", "translation", "translation=-1", "chat=0,translation=0,summarization=0,qa=0,rag=0,math=0,"
                "code_completion=0,code_edit=0"):
        with pytest.raises(SystemExit):
            build_tasks.parse_args(["--split", "train", "--mix", mix, "--out", "x.jsonl"])
        assert capsys.readouterr().err.count("\n") == 1
