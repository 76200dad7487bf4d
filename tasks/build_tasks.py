#!/usr/bin/env python3
"""Build the prompt sets of the hydra-lite multi-task benchmark (8 families, SmolLM2-135M-Instruct).

    python tasks/build_tasks.py --split heldout --out tasks/heldout.jsonl          # the committed 8 x 20 set
    python tasks/build_tasks.py --split train --n 6000 --out runs/tasks_train.jsonl  # self-distillation prompts

Text comes from pinned Debian packages (apt-get download + dpkg -x), pinned pure-Python wheels from PyPI
(pip download --no-deps) and this interpreter's standard library, cached under .models/task_sources/.
Every source document has an id (a man page name, a module file, a package, a release) whose stable bucket
sha256(id) % 10 decides its split: buckets 0-1 are held out, 2-9 train, so the splits share no document.
Math prompts come from our own templates; held-out prompts use templates that training never sees.
Output rows: {"id", "task", "prompt", "source", "licence", "prompt_tokens"}. See tasks/SOURCES.md.
"""
import argparse
import ast
import email
import gzip
import hashlib
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import task_text as tt  # noqa: E402  (troff, README and licence helpers, and the math templates)

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".models" / "task_sources"
DEFAULT_TOKENIZER = "checkpoints/smollm2-135m-instruct/tokenizer.json"
SEED = 20240611
HELDOUT_BUCKETS = (0, 1)
PER_FAMILY_HELDOUT = 20
FAMILIES = ["chat", "translation", "summarization", "qa", "rag", "math", "code_completion", "code_edit"]
# Training mix: about the held-out mix, with chat and code a bit heavier.
TRAIN_MIX = {"chat": .16, "translation": .12, "summarization": .11, "qa": .11, "rag": .11, "math": .11,
             "code_completion": .14, "code_edit": .14}
# Prompt-token ranges each family must respect (checked for every row, both splits).
TOKEN_RANGES = {"chat": (20, 200), "translation": (40, 450), "summarization": (500, 2100), "qa": (160, 680),
                "rag": (600, 1900), "math": (30, 200), "code_completion": (60, 600), "code_edit": (150, 1100)}

# Pinned versions (Debian 12 "bookworm" main, none from the security archive, which replaces versions).
DEBIAN = {
    "manpages": "6.03-2", "manpages-dev": "6.03-2",
    "manpages-fr": "4.18.1-1", "manpages-de": "4.18.1-1", "manpages-es": "4.18.1-1",
    "manpages-it": "4.18.1-1", "manpages-pt-br": "4.18.1-1",
    "coreutils": "9.1-1", "grep": "3.8-5", "sed": "4.9-1+deb12u1", "diffutils": "1:3.8-4", "gzip": "1.12-1",
    "util-linux": "2.38.1-5+deb12u3", "bsdextrautils": "2.38.1-5+deb12u3", "procps": "2:4.0.2-3",
    "less": "590-2.1~deb12u2", "man-db": "2.11.2-2", "gawk": "1:5.2.1-2", "psmisc": "23.6-1",
    "file": "1:5.44-3", "make": "4.3-4.1", "bc": "1.07.1-3+b1", "dpkg": "1.21.23", "e2fsprogs": "1.47.0-2+b2",
    "iproute2": "6.1.0-3", "tree": "2.1.0-1", "htop": "3.2.2-2", "ncdu": "1.18-0.2", "moreutils": "0.67-1",
    "time": "1.9-0.2", "cpio": "2.13+dfsg-7.1", "mawk": "1.3.4.20200120-3.1", "dash": "0.5.12-2",
    "screen": "4.9.0-4", "tmux": "3.3a-3", "units": "2.22-2", "dos2unix": "7.4.3-1", "datamash": "1.7-2",
    "debianutils": "5.7-0.5~deb12u1",
}
L10N = {"manpages-fr": ("fr", "French"), "manpages-de": ("de", "German"), "manpages-es": ("es", "Spanish"),
        "manpages-it": ("it", "Italian"), "manpages-pt-br": ("pt_BR", "Portuguese")}
PYPI = {
    "arrow": "1.4.0", "attrs": "26.1.0", "bleach": "6.4.0", "boltons": "26.2.0", "cachetools": "8.0.2",
    "click": "8.5.1", "colorama": "0.4.6", "decorator": "5.3.1", "filelock": "4.3.1", "flask": "3.1.3",
    "html5lib": "1.1", "httpx": "0.28.1", "humanize": "4.17.0", "idna": "3.20", "itsdangerous": "2.2.0",
    "jinja2": "3.1.6", "jsonschema": "4.26.0", "marshmallow": "4.4.0", "more-itertools": "11.2.1",
    "networkx": "3.6.1", "packaging": "26.4", "parse": "1.22.4", "platformdirs": "4.14.9", "pluggy": "1.7.0",
    "pyparsing": "3.3.3", "python-dateutil": "4.0.0", "requests": "2.34.2", "rich": "15.0.0", "six": "1.17.0",
    "sortedcontainers": "2.4.0", "sqlparse": "0.6.1", "tabulate": "0.10.0", "toolz": "1.2.0",
    "tqdm": "4.70.1", "typer": "0.29.2", "urllib3": "2.8.0", "werkzeug": "3.1.9",
}
STDLIB_SKIP = ("site-packages/", "test/", "idlelib/", "lib2to3/", "turtledemo/", "ensurepip/", "config-")


class BuildError(Exception):
    """A failure worth one line on stderr and exit code 2 (bad input, failed download)."""


def log(msg):
    print(f"build_tasks: {msg}", file=sys.stderr, flush=True)


def bucket(doc_id):
    return int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 10


def split_of(doc_id):
    return "heldout" if bucket(doc_id) in HELDOUT_BUCKETS else "train"


# ----------------------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------------------
class TokenCounter:
    """SmolLM2 token counts, or words * 1.4 (with a warning) when the tokenizer file is missing."""

    def __init__(self, path):
        self.tok, self.cache = None, {}
        if path.is_file():
            from tokenizers import Tokenizer
            self.tok = Tokenizer.from_file(str(path))
        else:
            log(f"warning: tokenizer {path} not found; estimating tokens as words * 1.4 "
                "(the held-out set built this way differs from the committed one)")

    def __call__(self, text):
        if text not in self.cache:
            self.cache[text] = (len(self.tok.encode(text, add_special_tokens=False).ids) if self.tok
                                else round(len(text.split()) * 1.4))
        return self.cache[text]


# ----------------------------------------------------------------------------------------------------------
# Downloads (cached)
# ----------------------------------------------------------------------------------------------------------
def run_quiet(cmd, cwd, label):
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"{label} failed: {e}") from None
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError(f"{label} failed: {last}")


def fetch_debian(name, version):
    """Download name=version once and unpack it (dpkg -x); returns the unpacked root."""
    root = CACHE / "debian" / f"{name}_{version.replace(':', '%3a')}"
    if (root / ".done").exists():
        return root
    log(f"downloading Debian package {name}={version}")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        run_quiet(["apt-get", "download", f"{name}={version}"], tmp, f"apt-get download {name}={version}")
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise BuildError(f"apt-get download {name}={version} produced no .deb")
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        run_quiet(["dpkg", "-x", str(debs[0]), str(root)], tmp, f"dpkg -x {debs[0].name}")
        fields = subprocess.run(["dpkg-deb", "-f", str(debs[0]), "Description"], capture_output=True, text=True)
        (root / "DESCRIPTION.txt").write_text(fields.stdout)
    (root / ".done").write_text("ok\n")
    return root


def fetch_wheel(name, version):
    """Download the pinned py3-none-any wheel once; returns its path."""
    dest = CACHE / "pypi"
    dest.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_").lower()
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    if found:
        return found[0]
    log(f"downloading wheel {name}=={version}")
    run_quiet([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.11", "-d", str(dest), f"{name}=={version}"], dest,
              f"pip download {name}=={version}")
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    if not found:
        raise BuildError(f"pip download {name}=={version} produced no wheel")
    return found[0]


# ----------------------------------------------------------------------------------------------------------
# Source documents
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ManPage:
    pkg: str
    version: str
    lang: str          # "en" or an l10n code
    relpath: str
    name: str
    section: str
    licence: str
    page: tt.Page

    @property
    def doc(self):     # the split key ignores the language, so a page and its translations share a split
        return f"man:{self.name}.{self.section}"

    def source(self, part=""):
        return f"{self.pkg} {self.version}: {self.relpath}" + (f" ({part})" if part else "")


@dataclass
class PyFile:
    origin: str        # "python-stdlib" or the PyPI name
    version: str
    relpath: str
    licence: str
    text: str
    doc: str

    def source(self, part=""):
        return f"{self.origin} {self.version}: {self.relpath}" + (f" ({part})" if part else "")


@dataclass
class TextDoc:         # a README, a release's notes, a package description, a module docstring
    kind: str
    title: str
    text: str
    doc: str
    source: str
    licence: str
    extra: dict = field(default_factory=dict)


def read_copyright(pkg, root):
    """debian/copyright of a package; a -dev package whose doc folder links to its base package uses that one."""
    doc = root / "usr/share/doc" / pkg
    if doc.is_symlink() and Path(doc.readlink()).name in DEBIAN:
        base = Path(doc.readlink()).name
        doc = fetch_debian(base, DEBIAN[base]) / "usr/share/doc" / base
    if not (doc / "copyright").is_file():
        raise BuildError(f"{pkg}: no usr/share/doc/{pkg}/copyright in the package")
    return (doc / "copyright").read_text(errors="replace")


def load_debian():
    """All man pages (English and translated), package descriptions and GNU release notes."""
    pages, texts = [], []
    for pkg, version in sorted(DEBIAN.items()):
        root = fetch_debian(pkg, version)
        copyright = tt.DebianCopyright(read_copyright(pkg, root))
        lang = L10N.get(pkg, ("en",))[0]
        mandir = root / "usr/share/man" / ("" if lang == "en" else lang)
        for path in sorted(mandir.glob("man[1-8]/*.gz")):
            if path.is_symlink():
                continue
            raw = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
            page = tt.parse_man(raw)
            if page is None:
                continue
            name, section = path.name[:-3].rsplit(".", 1)
            rel = path.relative_to(root).as_posix()
            if lang == "en":
                licence = copyright.licence(f"man{section[:1]}/{name}.{section}", raw)
            else:   # a translation: the translators' licence and that of the English original (its SPDX tag)
                original = copyright.licence("", raw)
                licence = copyright.licence() + ("" if original == copyright.licence() else f" AND {original}")
            pages.append(ManPage(pkg, version, lang, rel, name, section[:1], licence, page))
        pkg_licence = copyright.licence()
        desc = (root / "DESCRIPTION.txt").read_text().strip()
        if lang == "en" and desc:
            texts.append(TextDoc("debdesc", pkg, tt.debian_description(desc), f"debian:{pkg}",
                                 f"{pkg} {version}: DEBIAN/control (Description)", pkg_licence,
                                 {"short": desc.splitlines()[0].strip()}))
        news = root / "usr/share/doc" / pkg / "NEWS.gz"
        if news.exists():
            for release, notes in tt.gnu_news_releases(gzip.decompress(news.read_bytes()).decode(errors="replace")):
                texts.append(TextDoc("news", f"{pkg} {release}", notes, f"news:{pkg}:{release}",
                                     f"{pkg} {version}: usr/share/doc/{pkg}/NEWS.gz (release {release})",
                                     pkg_licence, {"pkg": pkg, "release": release}))
    log(f"Debian: {len(pages)} man pages, {len(texts)} descriptions and release notes")
    return pages, texts


def stdlib_files():
    root = Path(sysconfig.get_paths()["stdlib"])
    version = "%d.%d.%d" % sys.version_info[:3]
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(STDLIB_SKIP) or "/test" in rel or "/tests/" in rel or path.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        files.append(PyFile("python-stdlib", version, f"Lib/{rel}", "PSF-2.0", text, f"stdlib:{rel}"))
    return files


def load_pypi():
    """Each wheel's .py files, its README (METADATA body) and its summary; one document per package."""
    files, texts = [], []
    for name, version in sorted(PYPI.items()):
        with zipfile.ZipFile(fetch_wheel(name, version)) as zf:
            names = sorted(zf.namelist())
            meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
            meta = email.message_from_bytes(zf.read(meta_name))
            licence_files = [n for n in names if "/licenses/" in n.lower()
                             or n.split("/")[-1].upper().startswith(("LICENSE", "LICENCE", "COPYING"))]
            licence = tt.wheel_licence(meta, {n: zf.read(n) for n in licence_files})
            doc = f"pypi:{name}"
            for n in names:
                if n.endswith(".py") and ".dist-info/" not in n and "/tests/" not in n and "/test_" not in n:
                    files.append(PyFile(name, version, n, licence, zf.read(n).decode("utf-8", "replace"), doc))
            readme = tt.clean_readme(meta.get_payload(), meta.get("Description-Content-Type") or "")
            texts.append(TextDoc("readme", f"{name} README", readme, doc,
                                 f"{name} {version}: README (wheel METADATA)", licence,
                                 {"pkg": name, "summary": (meta.get("Summary") or "").strip()}))
    log(f"PyPI: {len(PYPI)} wheels, {len(files)} Python files")
    return files, texts


def module_docstrings(pyfiles):
    out = []
    for f in pyfiles:
        if f.origin != "python-stdlib":
            continue
        try:
            doc = ast.get_docstring(ast.parse(f.text))
        except SyntaxError:
            continue
        if doc and len(doc.split()) >= 12 and "\\" not in doc:
            module = f.relpath[4:-3].replace("/", ".").removesuffix(".__init__")
            out.append(TextDoc("moddoc", f"Python {module} module", doc.strip(), f.doc,
                               f.source("module docstring"), f.licence, {"module": module}))
    return out


@dataclass
class Corpus:
    pages: list
    pyfiles: list
    texts: list

    def man(self, split, lang="en"):
        return [p for p in self.pages if p.lang == lang and split_of(p.doc) == split]

    def text_docs(self, split, kind):
        return [t for t in self.texts if t.kind == kind and split_of(t.doc) == split]

    def py(self, split):
        return [f for f in self.pyfiles if split_of(f.doc) == split]


def load_corpus():
    CACHE.mkdir(parents=True, exist_ok=True)
    pages, deb_texts = load_debian()
    wheel_files, readmes = load_pypi()
    std = stdlib_files()
    log(f"stdlib: {len(std)} module files")
    return Corpus(pages, std + wheel_files, deb_texts + readmes + module_docstrings(std))


# ----------------------------------------------------------------------------------------------------------
# Candidates and selection
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Cand:
    group: str         # template or sub-kind: selection cycles over groups
    docs: tuple        # split keys of every source document used
    prompt: str
    source: str
    licence: str
    key: str = ""      # duplicates by key are dropped (default: the prompt itself)


def select(cands, n, rng, counter, task):
    """Pick n candidates cycling over groups, preferring documents not used yet, within the token range."""
    lo, hi = TOKEN_RANGES[task]
    groups = defaultdict(list)
    for c in sorted(cands, key=lambda c: (c.group, c.docs, c.prompt)):
        groups[c.group].append(c)
    names = sorted(groups)
    rng.shuffle(names)
    for g in names:
        rng.shuffle(groups[g])
    used, seen, out = Counter(), set(), []
    while len(out) < n and any(groups.values()):
        for g in names:
            pool = groups[g]
            while pool and len(out) < n:
                # Look ahead a little for the least-used documents, so n prompts cover many documents.
                i = min(range(min(len(pool), 64)), key=lambda k: sum(used[d] for d in pool[k].docs))
                c = pool.pop(i)
                if (c.key or c.prompt) in seen or not lo <= counter(c.prompt) <= hi:
                    continue
                seen.add(c.key or c.prompt)
                used.update(c.docs)
                out.append(c)
                break
    if len(out) < n:
        raise BuildError(f"{task}: only {len(out)} usable prompts for the requested {n}")
    return out


def quota(n, weights):
    """Split n over the keys of weights (largest remainder), deterministically."""
    total = sum(weights.values())
    raw = {k: n * w / total for k, w in weights.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (out[k] - raw[k], k))[: n - sum(out.values())]:
        out[k] += 1
    return out


# ----------------------------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------------------------
def pick_template(templates, split, rng):
    """Held-out prompts use the base templates; training adds its extra ones (marked train_only)."""
    usable = [t for t in templates if split == "train" or not t.startswith("@")]
    return rng.choice(usable).lstrip("@")


def prose_paragraphs(page, lo_words=40, hi_words=200):
    for heading, block in page.page.prose_blocks():
        words = len(block.split())
        if lo_words <= words <= hi_words and tt.is_clean_prose(block):
            yield heading, block


def family_translation(corpus, split, n, rng, counter):
    half = quota(n, {"out": 1, "in": 1})
    out_cands, in_cands = [], []
    for _pkg, (code, language) in sorted(L10N.items()):
        for p in corpus.man(split, code):
            for heading, para in prose_paragraphs(p):
                prompt = pick_template(tt.TRANSLATE_TO_ENGLISH, split, rng).format(text=para, language=language)
                out_cands.append(Cand(f"from-{code}", (p.doc,), prompt, p.source(heading), p.licence))
    languages = [lang for _, lang in sorted(L10N.values())]
    for p in corpus.man(split):
        for heading, para in prose_paragraphs(p):
            language = rng.choice(languages)
            prompt = pick_template(tt.TRANSLATE_FROM_ENGLISH, split, rng).format(text=para, language=language)
            in_cands.append(Cand(f"into-{language}", (p.doc,), prompt, p.source(heading), p.licence))
    return select(out_cands, half["out"], rng, counter, "translation") + \
        select(in_cands, half["in"], rng, counter, "translation")


def truncate_blocks(blocks, counter, limit):
    """Join text blocks until the next one would pass `limit` tokens (block counts + 1 per separator is close
    to the count of the joined text; the caller checks the exact count). A dangling short heading is dropped."""
    kept, total = [], 0
    for b in blocks:
        total += counter(b) + 1
        if total > limit:
            break
        kept.append(b)
    while kept and len(kept[-1].split()) < 8 and kept[-1].rstrip()[-1:] not in ".:;!?)":
        kept.pop()
    return "\n\n".join(kept)


def summarization_docs(corpus, split, counter):
    docs = []
    for p in corpus.man(split):
        blocks = [p.page.title] + p.page.render_sections(skip=tt.MAN_SKIP_SECTIONS, with_headings=True)
        text = truncate_blocks(blocks, counter, 1850)
        if counter(text) >= 520:
            docs.append(("man", f"the {p.name}({p.section}) manual page", text, p.doc, p.source(), p.licence))
    for t in corpus.text_docs(split, "moddoc") + corpus.text_docs(split, "readme"):
        text = truncate_blocks(t.text.split("\n\n"), counter, 1850)
        if counter(text) >= 520:
            docs.append((t.kind, t.title, text, t.doc, t.source, t.licence))
    return docs


def family_summarization(corpus, split, n, rng, counter):
    cands = []
    for kind, title, text, doc, source, licence in summarization_docs(corpus, split, counter):
        for _ in range(2 if split == "train" else 1):
            tpl = pick_template(tt.SUMMARIZE[kind] + tt.SUMMARIZE["any"], split, rng)
            cands.append(Cand(kind, (doc,), tpl.format(text=text, title=title), source, licence))
    return select(cands, n, rng, counter, "summarization")


def item_windows(page, counter, rng, lo=160, hi=560):
    """Runs of consecutive option/error items from one section, lo..hi tokens, with their items."""
    for heading, items in page.page.item_runs():
        if len(items) < 3:
            continue
        starts = sorted(rng.sample(range(len(items)), min(len(items), 4)))
        for s in starts:
            window = []
            for item in items[s:]:
                if counter(tt.render_items(window + [item])) > hi:
                    break
                window.append(item)
            if len(window) >= 3 and counter(tt.render_items(window)) >= lo:
                yield heading, window


def qa_question(page, heading, window, rng, split, rag=False):
    """(kind, question) whose answer is one item of the window: its description, or its tag for "which option"
    questions. RAG questions name the command, since several documents stand before them."""
    tags, descs = [t for t, _ in window], [d for _, d in window]
    options = [(t, d) for t, d in window if tags.count(t) == 1 and descs.count(d) == 1 and 3 <= len(d.split()) <= 60
               and not t.startswith(("--help", "--version", "-?"))]
    if not options:
        return None
    tag, desc = rng.choice(options)
    cmd = page.name + ("()" if page.section in "23" else "")
    first = re.sub(r"\s*\(.*\)$", "", tag.split(",")[0]).strip()   # "CAP_LEASE (since Linux 2.4)" -> "CAP_LEASE"
    if tag.startswith("-"):
        first = re.split(r"[\s=\[]", first)[0]                      # "-o FORMAT", "--to=UNIT" -> the option
    errors = "ERROR" in heading.upper() and re.fullmatch(r"E[A-Z0-9]+", first)
    kind = "error" if errors else "option" if tag.startswith("-") else "item"
    if len(first) < 2:
        return None
    short = len(desc.split()) <= 25
    if rag:
        kind = "reverse" if kind == "option" and short and rng.random() < .3 else kind
        tpl = rng.choice(tt.RAG_QUESTIONS[kind])
    elif kind == "option":
        tpl = pick_template(tt.QA_OPTION + (tt.QA_REVERSE if short else []), split, rng)
        forms = [f.strip() for f in tag.split(",")]
        if len(forms) == 2 and re.fullmatch(r"-\w", forms[0]) and forms[1].startswith("--") and rng.random() < .2:
            tpl = f"What is the long form of the {forms[0]} option of {{cmd}}, according to the excerpt?"
    else:
        tpl = pick_template(tt.QA_ERROR if kind == "error" else tt.QA_ITEM, split, rng)
    return kind, tpl.format(cmd=cmd, tag=first, desc=desc.rstrip(".").strip())


def family_qa(corpus, split, n, rng, counter):
    cands = []
    for p in corpus.man(split):
        for heading, window in item_windows(p, counter, rng):
            asked = qa_question(p, heading, window, rng, split)
            if not asked:
                continue
            kind, question = asked
            passage = f"{p.name}({p.section}) manual page, {heading}:\n\n" + tt.render_items(window)
            layout = rng.choice(tt.QA_LAYOUTS)
            cands.append(Cand(kind, (p.doc,), layout.format(passage=passage, question=question),
                              p.source(heading), p.licence, key=f"{p.doc} {question}"))
    return select(cands, n, rng, counter, "qa")


def rag_distractors(corpus, split, counter):
    """Passages of 120-420 tokens from man DESCRIPTIONs, module docstrings and README sections."""
    out = []
    for p in corpus.man(split):
        text = truncate_blocks(p.page.render_sections(only=("DESCRIPTION",)), counter, 420)
        if counter(text) >= 120:
            out.append((f"{p.name}({p.section}) manual page: DESCRIPTION", text, p.doc, p.source("DESCRIPTION"),
                        p.licence))
    for t in corpus.text_docs(split, "moddoc") + corpus.text_docs(split, "readme"):
        text = truncate_blocks(t.text.split("\n\n"), counter, 420)
        if counter(text) >= 120:
            out.append((t.title, text, t.doc, t.source, t.licence))
    return out


def family_rag(corpus, split, n, rng, counter):
    pool = rag_distractors(corpus, split, counter)
    cands = []
    for p in corpus.man(split):
        for heading, window in item_windows(p, counter, rng, lo=120, hi=400):
            asked = qa_question(p, heading, window, rng, split, rag=True)
            if not asked:
                continue
            question = asked[1]
            target = (f"{p.name}({p.section}) manual page: {heading}", tt.render_items(window), p.doc,
                      p.source(heading), p.licence)
            others = [d for d in rng.sample(pool, min(len(pool), 12)) if d[2] != p.doc and p.name not in d[1]]
            k = rng.randint(2, 4)
            chosen, docs = [], {p.doc}
            for d in others:
                if d[2] not in docs and len(chosen) < k:
                    chosen.append(d)
                    docs.add(d[2])
            passages = chosen[:]
            passages.insert(rng.randint(0, len(chosen)), target)
            body = "\n\n".join(f"[{i}] {title}\n{text}" for i, (title, text, *_rest) in enumerate(passages, 1))
            instruction = pick_template(tt.RAG_INSTRUCTIONS, split, rng)
            prompt = f"{body}\n\n{instruction}\nQuestion: {question}"
            cands.append(Cand(f"{len(passages)}-{asked[0]}", tuple(d[2] for d in passages), prompt,
                              "; ".join(d[3] for d in passages), "; ".join(d[4] for d in passages),
                              key=f"{p.doc} {question}"))
    return select(cands, n, rng, counter, "rag")


def family_math(corpus, split, n, rng, counter):
    templates = tt.math_templates(split)
    cands = []
    for name, make in sorted(templates.items()):
        for _ in range(max(6, 3 * n // len(templates))):
            question, answer = make(rng)
            assert isinstance(answer, int) and answer >= 0, (name, answer)
            prompt = f"{question} {rng.choice(tt.MATH_SUFFIXES)}"
            cands.append(Cand(name, (f"math:{name}",), prompt,
                              f"hydra-lite tasks/task_text.py: original math template {name}", tt.ORIGINAL_LICENCE))
    return select(cands, n, rng, counter, "math")


def family_code_completion(corpus, split, n, rng, counter):
    cands = []
    for f in corpus.py(split):
        for fn in tt.functions(f.text):
            head = tt.completion_head(fn, rng)
            if head:
                tpl = pick_template(tt.COMPLETE, split, rng)
                cands.append(Cand("stdlib" if f.origin == "python-stdlib" else "pypi", (f.doc,),
                                  tpl.format(code=head, module=f.relpath), f.source(fn.qualname), f.licence))
    return select(cands, n, rng, counter, "code_completion")


def family_code_edit(corpus, split, n, rng, counter):
    cands = []
    for f in corpus.py(split):
        for fn in tt.functions(f.text):
            if not 20 <= fn.n_lines <= 80:
                continue
            for group, code, instruction in tt.applicable_edits(fn, rng, split):
                layout = rng.choice(tt.EDIT_LAYOUTS)
                cands.append(Cand(group, (f.doc,),
                                  layout.format(code=code, instruction=instruction),
                                  f.source(fn.qualname), f.licence))
    return select(cands, n, rng, counter, "code_edit")


def name_line(page):
    """The description part of a NAME line ("ls - list directory contents" -> "list directory contents")."""
    m = re.match(r"(.+?)\s+[-\u2013\u2014]+\s+(.+)", page.page.title)
    what = m.group(2).strip().rstrip(".") if m else ""
    return what if 2 <= len(what.split()) <= 14 and "\\" not in what and not what[:1].isupper() else ""


def first_paragraphs(text, max_words):
    kept = []
    for para in text.split("\n\n"):
        if sum(len(p.split()) for p in kept + [para]) > max_words:
            break
        kept.append(para)
    return "\n\n".join(kept)


def related_pairs(commands):
    """Pairs of commands of one package whose NAME lines share a content word (cp/mv: "files")."""
    stop = {"a", "an", "the", "and", "or", "of", "to", "in", "for", "on", "with", "from", "by", "file", "files"}
    pairs = []
    for _pkg, cmds in sorted(commands.items()):
        free = list(cmds)
        while free:
            a, wa = free.pop(0)
            words = set(re.findall(r"\w+", wa.lower())) - stop
            match = next((c for c in free if words & (set(re.findall(r"\w+", c[1].lower())) - stop)), None)
            if match:
                free.remove(match)
                pairs.append(((a, wa), match))
    return pairs


def chat_sources(corpus, split, rng):
    """(group, fields, docs, source, licence): the chat templates each source text can fill."""
    out, commands = [], defaultdict(list)
    for p in corpus.man(split):
        what = name_line(p)
        if what and p.section in "18" and tt.is_verb_phrase(what):
            out.append(("fit_command", {"what": what, "name": p.name}, (p.doc,), p.source("NAME"), p.licence))
            commands[p.pkg].append((p, what))
        elif what and p.section in "23":
            what = "to " + what if tt.is_verb_phrase(what) else what
            out.append(("fit_function", {"what": what, "name": p.name}, (p.doc,), p.source("NAME"), p.licence))
        for heading, para in prose_paragraphs(p, 30, 110):
            group = rng.choice(["friendlier", "shorter", "plain", "faq", "titles"])
            out.append((group, {"text": para}, (p.doc,), p.source(heading), p.licence))
    for (a, wa), (b, wb) in related_pairs(commands):
        out.append(("compare", {"a": a.name, "b": b.name, "wa": wa, "wb": wb}, (a.doc, b.doc),
                    f"{a.source('NAME')}; {b.source('NAME')}", f"{a.licence}; {b.licence}"))
    for t in corpus.text_docs(split, "readme"):
        summary = re.sub(rf"^{re.escape(t.extra['pkg'])}\s*[-:]+\s*", "", t.extra["summary"], flags=re.I)
        fields = {"pkg": t.extra["pkg"], "summary": summary.rstrip(".")}
        for group in ("fit_pypi", "tweet", "email", "poem"):
            out.append((group, fields, (t.doc,), t.source.replace("README", "Summary"), t.licence))
    for t in corpus.text_docs(split, "debdesc"):
        desc = first_paragraphs(t.text, 110)
        if len(desc.split()) >= 15:
            out.append(("product", {"pkg": t.title, "desc": desc}, (t.doc,), t.source, t.licence))
    for t in corpus.text_docs(split, "moddoc"):
        first = " ".join(t.text.split("\n\n")[0].split())
        if 6 <= len(first.split()) <= 45 and first.endswith("."):
            out.append(("stdlib", {"module": t.extra["module"], "first": first}, (t.doc,), t.source, t.licence))
    for t in corpus.text_docs(split, "news"):
        notes = first_paragraphs(t.text, 120)
        if len(notes.split()) >= 25:
            for group in ("announce", "users"):
                out.append((group, {"notes": notes, "title": t.title}, (t.doc,), t.source, t.licence))
    return out


def family_chat(corpus, split, n, rng, counter):
    cands = []
    for group, fields, docs, source, licence in chat_sources(corpus, split, rng):
        prompt = pick_template(tt.CHAT[group], split, rng).format(**fields)
        cands.append(Cand(group, docs, prompt, source, licence))
    return select(cands, n, rng, counter, "chat")


FAMILY_BUILDERS = {"chat": family_chat, "translation": family_translation, "summarization": family_summarization,
                   "qa": family_qa, "rag": family_rag, "math": family_math,
                   "code_completion": family_code_completion, "code_edit": family_code_edit}


# ----------------------------------------------------------------------------------------------------------
# Output and checks
# ----------------------------------------------------------------------------------------------------------
def build(split, n, counter, mix=None, seed=0):
    corpus = load_corpus()
    counts = ({f: PER_FAMILY_HELDOUT for f in FAMILIES} if split == "heldout" else quota(n, mix or TRAIN_MIX))
    rows = []
    for family in FAMILIES:
        # One generator per family, seeded by family and split, so families do not perturb each other.
        # (seed: other draws from the same training documents, for a fresh round of answers; 0: the first draws)
        rng = random.Random(f"{SEED}:{split}:{family}" + (f":{seed}" if seed else ""))
        picked = FAMILY_BUILDERS[family](corpus, split, counts[family], rng, counter)
        rng.shuffle(picked)
        for i, c in enumerate(picked, 1):
            assert all(split_of(d) == split or d.startswith("math:") for d in c.docs), (family, c.docs)
            rows.append({"id": f"{family}-{i:02d}" if split == "heldout" else f"{family}-{i:05d}",
                         "task": family, "prompt": c.prompt, "source": c.source, "licence": c.licence,
                         "prompt_tokens": counter(c.prompt), "_docs": c.docs})
        log(f"{family}: {len(picked)} prompts")
    check_disjoint(rows, split)
    return rows


def doc_ids_from_source(source):
    """The split keys of a row, read back from its `source` field (so tests can check a written file)."""
    ids = set()
    for part in source.split("; "):
        pkg, _, rest = part.partition(" ")
        m = re.search(r"usr/share/man/(?:[a-z_A-Z]+/)?man\d/(.+)\.(\d)[^.]*\.gz", rest)
        news = re.search(r"NEWS\.gz \(release (.+)\)", rest)
        if m:
            ids.add(f"man:{m.group(1)}.{m.group(2)}")
        elif pkg == "python-stdlib":
            ids.add("stdlib:" + re.search(r"Lib/(\S+\.py)", rest).group(1))
        elif pkg in PYPI:
            ids.add(f"pypi:{pkg}")
        elif news:
            ids.add(f"news:{pkg}:{news.group(1)}")
        elif "DEBIAN/control" in rest:
            ids.add(f"debian:{pkg}")
        elif "original math template" in rest:
            ids.add("math:" + rest.rsplit(" ", 1)[1])
        else:
            raise ValueError(f"unrecognised source {part!r}")
    return ids


def check_disjoint(rows, split):
    """No document of one split may feed the other (math: held-out templates are never used for training)."""
    heldout_math = set(tt.math_templates("heldout"))
    for r in rows:
        assert doc_ids_from_source(r["source"]) == set(r["_docs"]), (r["source"], r["_docs"])
        for d in r["_docs"]:
            if d.startswith("math:"):
                assert (d[5:] in heldout_math) == (split == "heldout"), d
            else:
                assert split_of(d) == split, d


def summarize(rows):
    by = defaultdict(list)
    for r in rows:
        by[r["task"]].append(r["prompt_tokens"])
    for fam in FAMILIES:
        t = by.get(fam, [])
        if t:
            log(f"  {fam:16s} {len(t):5d} prompts, tokens min {min(t)} "
                f"median {int(statistics.median(t))} max {max(t)}")


def write_jsonl(rows, out):
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, ensure_ascii=False) + "\n")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"build_tasks: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_mix(text, split):
    """--mix "translation=0.24,chat=0.2" -> TRAIN_MIX with those weights changed."""
    mix = dict(TRAIN_MIX)
    for item in filter(None, text.split(",")):
        family, _, weight = item.partition("=")
        if family not in mix:
            raise ValueError(f"--mix: unknown family {family!r} (one of {', '.join(FAMILIES)})")
        try:
            mix[family] = float(weight)
        except ValueError:
            raise ValueError(f"--mix: {item!r} is not FAMILY=WEIGHT") from None
        if not 0 <= mix[family] <= 10:
            raise ValueError(f"--mix: weight {mix[family]} of {family} is not between 0 and 10")
    if text and split != "train":
        raise ValueError("--mix applies to the train split only")
    if sum(mix.values()) <= 0:
        raise ValueError("--mix: the weights add up to 0")
    return mix


def parse_args(argv):
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", required=True, choices=["heldout", "train"])
    ap.add_argument("--n", type=int, help="number of training prompts (train split only; default 6000)")
    ap.add_argument("--mix", default="", help="train split: family weights to change, e.g. translation=0.24 (the "
                    "others keep theirs from TRAIN_MIX; weights are relative)")
    ap.add_argument("--seed", type=int, default=0, help="train split: other draws of prompts from the same training "
                    "documents (each round of heads can learn from fresh answers; 0: the first draws)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tokenizer", type=Path, default=Path(DEFAULT_TOKENIZER),
                    help=f"SmolLM2 tokenizer.json (default {DEFAULT_TOKENIZER}, relative to the repo)")
    args = ap.parse_args(argv)
    if args.split == "heldout" and args.n is not None:
        ap.error("--n applies to the train split only (the held-out set is fixed at 8 x 20)")
    if args.split == "heldout" and args.seed:
        ap.error("--seed applies to the train split only (the held-out set is fixed)")
    if args.split == "train":
        args.n = 6000 if args.n is None else args.n
        if not 8 <= args.n <= 10000:   # summarization runs out first (~1200 usable prompts, 11% of n)
            ap.error(f"--n must be between 8 and 10000, got {args.n}")
    try:
        args.mix = parse_mix(args.mix, args.split)
    except ValueError as e:
        ap.error(str(e))
    if not args.tokenizer.is_absolute() and not args.tokenizer.exists():
        args.tokenizer = REPO / args.tokenizer
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        counter = TokenCounter(args.tokenizer)
        rows = build(args.split, args.n, counter, args.mix, args.seed)
        write_jsonl(rows, args.out)
    except BuildError as e:
        print(f"build_tasks: error: {e}", file=sys.stderr)
        return 2
    log(f"wrote {len(rows)} rows to {args.out}")
    summarize(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
