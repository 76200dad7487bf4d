"""Text helpers for tasks/build_tasks.py: troff to prose, README cleaning, licence metadata, Python function
extraction, prompt templates and the original math word-problem templates.

Templates whose text starts with "@" are used for the training split only (build_tasks.pick_template).
"""
import ast
import fnmatch
import re
import textwrap
from dataclasses import dataclass

ORIGINAL_LICENCE = "LicenseRef-hydra-lite-original"

# ----------------------------------------------------------------------------------------------------------
# troff / man(7) to structured plain text
# ----------------------------------------------------------------------------------------------------------
NAMED_CHARS = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d",
    "oq": "\u2018", "cq": "\u2019", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122",
    "mu": "\u00d7", "di": "\u00f7", "+-": "\u00b1", "<=": "\u2264", ">=": "\u2265", "!=": "\u2260",
    "->": "\u2192", "<-": "\u2190", "ga": "`", "ti": "~", "ha": "^", "sc": "\u00a7", "de": "\u00b0",
    "fm": "\u2032", "pl": "+", "mi": "-", "eq": "=", "**": "*", "ul": "_", "rs": "\\", "sl": "/", "ba": "|",
    "br": "|", "Fo": "\u00ab", "Fc": "\u00bb", "fo": "\u2039", "fc": "\u203a", "Eu": "\u20ac", "eu": "\u20ac",
    "Po": "\u00a3", "ct": "\u00a2", "ss": "\u00df", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "at": "@",
    "sh": "#", "dd": "\u2021", "dg": "\u2020", "ps": "\u00b6", "tno": "~", "ap": "~", "ua": "\u2191",
    "da": "\u2193", "rA": "\u21d2", "lA": "\u21d0", "hA": "\u21d4", "OK": "\u2713", "'e": "\u00e9",
    "'a": "\u00e1", "`e": "\u00e8", "`a": "\u00e0", ":u": "\u00fc", ":o": "\u00f6", ":a": "\u00e4",
}
STRINGS = {"lq": "\u201c", "rq": "\u201d", "R": "\u00ae", "Tm": "\u2122", "aq": "'"}
SINGLE = {"-": "-", "e": "\\", "\\": "\\", "&": "", "|": "", "^": "", "0": " ", " ": " ", "~": " ", "c": "",
          ":": "", "%": "", "/": "", ",": "", "'": "'", "`": "`", ".": ".", "t": " ", "a": "", "d": "", "u": "",
          "p": "", "r": "", "{": "", "}": "", "!": "", "?": ""}
INLINE = re.compile(r"""\\(?:
      f(?:\[[^\]]*\]|\(..|.)                     # font change
    | \((..)                                     # \(xx named character
    | \[([^\]]*)\]                               # \[name] named character
    | \*(?:\((..)|\[([^\]]*)\]|(.))              # defined string
    | s[-+]?(?:\(\d\d|\[\d+\]|\d)               # point size
    | [mnkYgFMV](?:\[[^\]]*\]|\(..|.)            # colours, registers ...
    | [hvwlLNDoXZbxSRC]'[^']*'                   # escapes with a quoted argument
    | (.)                                        # single-character escapes
)""", re.X)


def clean_inline(s):
    """Replace troff inline escapes by the characters they stand for."""
    def repl(m):
        named = m.group(1) or m.group(2)
        if named is not None:
            if named.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,5}(_.*)?", named):
                return chr(int(named[1:].split("_")[0], 16))
            return NAMED_CHARS.get(named, "")
        if m.group(3) or m.group(4) or m.group(5):
            return STRINGS.get(m.group(3) or m.group(4) or m.group(5), "")
        if m.group(6) is not None:
            return SINGLE.get(m.group(6), "\\" + m.group(6))   # an unknown escape stays, and marks the text unclean
        return ""
    return INLINE.sub(repl, s)


def macro_args(s):
    """Split a macro's argument string the way troff does (double quotes group, "" is a quote)."""
    args, i = [], 0
    while i < len(s):
        if s[i] == " ":
            i += 1
        elif s[i] == '"':
            j, buf = i + 1, []
            while j < len(s):
                if s[j] == '"':
                    if s[j + 1:j + 2] == '"':
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(s[j])
                j += 1
            args.append("".join(buf))
            i = j + 1
        else:
            j = i
            while j < len(s) and s[j] != " ":
                j += 2 if s[j] == "\\" else 1
            args.append(s[i:j])
            i = j
    return args


MAN_SKIP_SECTIONS = {
    "NAME", "SYNOPSIS", "SEE ALSO", "AUTHOR", "AUTHORS", "COPYRIGHT", "REPORTING BUGS", "COLOPHON", "LIBRARY",
    "NOM", "VOIR AUSSI", "AUTEUR", "AUTEURS", "SIGNALER DES BOGUES", "TRADUCTION", "BIBLIOTHÈQUE",
    "BEZEICHNUNG", "ÜBERSICHT", "SIEHE AUCH", "AUTOR", "AUTOREN", "FEHLER MELDEN", "ÜBERSETZUNG", "BIBLIOTHEK",
    "NOMBRE", "SINOPSIS", "VÉASE TAMBIÉN", "AUTORES", "INFORMAR DE ERRORES", "TRADUCCIÓN", "DERECHOS DE AUTOR",
    "NOME", "SINTASSI", "VEDERE ANCHE", "AUTORI", "SEGNALAZIONE BUG", "TRADUZIONE", "SEGNALAZIONE DEI BUG",
    "SINOPSE", "VEJA TAMBÉM", "RELATANDO PROBLEMAS", "TRADUÇÃO", "DIREITOS AUTORAIS", "BIBLIOTECA",
    "VERSIONS", "HISTORY", "STANDARDS", "CONFORMING TO",
}
IGNORED_REQUESTS = {"RS", "RE", "in", "ad", "na", "hy", "nh", "ne", "ft", "ti", "ps", "vs", "ll", "PD", "ds",
                    "nr", "so", "if", "ie", "el", "IX", "ta", "fam", "cs", "ss", "mso", "lf", "pc", "tr", "rm",
                    "hw", "UR", "MT", "TH", "DT", "ns", "rs", "bp", "ce", "ul", "cu", "HP", "ME", "UE", "YS",
                    "it", "nop", "as", "am", "ev", "ec", "eo", "cc", "c2", "hc", "lt", "po", "em", "ch", "wh"}
ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI"}


@dataclass
class Page:
    title: str          # the NAME line, "ls - list directory contents"
    sections: list      # [(heading, [block])]; block: ("para", text) | ("item", tag, text) | ("pre", text)

    def prose_blocks(self):
        for heading, blocks in self.sections:
            if heading.upper() not in MAN_SKIP_SECTIONS:
                for b in blocks:
                    if b[0] == "para":
                        yield heading, b[1]

    def item_runs(self):
        """Consecutive clean (tag, description) items, e.g. options or errno values."""
        for heading, blocks in self.sections:
            run = []
            for b in blocks + [("end", "")]:
                if b[0] == "item" and is_clean_item(b[1], b[2]):
                    run.append((b[1], b[2]))
                    continue
                if len(run) >= 3:
                    yield heading, run
                run = []

    def render_sections(self, skip=(), only=None, with_headings=False):
        out = []
        for heading, blocks in self.sections:
            if heading.upper() in skip or (only and heading.upper() not in only):
                continue
            rendered = [render_block(b) for b in blocks]
            rendered = [r for r in rendered if r and "\\" not in r]
            if rendered and with_headings:
                out.append(heading)
            out.extend(rendered)
        return out


def render_block(b):
    if b[0] == "item":
        return f"{b[1]}\n    {b[2]}"
    return b[1]


def render_items(items):
    return "\n\n".join(f"{tag}\n    {desc}" for tag, desc in items)


def is_clean_item(tag, desc):
    return (0 < len(tag) <= 60 and "\\" not in tag + desc and len(desc.split()) >= 3
            and not re.search(r"https?://|@\w", desc))


def is_clean_prose(text):
    letters = sum(ch.isalpha() or ch.isspace() for ch in text)
    return ("\\" not in text and not re.search(r"https?://|www\.|@\w|GPL|General Public|Copyright|\(C\)", text)
            and letters / max(1, len(text)) >= 0.85 and text[:1].isupper() and text.rstrip()[-1:] in ".!?:»")


def parse_man(raw):
    """Parse man(7) source into a Page; None for .so redirects and pages without a NAME line."""
    lines = preprocess_troff(raw)
    if any(line.startswith(".so ") for line in lines[:3]) and len(lines) < 5:
        return None
    sections, blocks = [], None
    state = {"mode": "text", "kind": "para", "tag": "", "buf": []}

    def flush():
        text = " ".join(state["buf"]).replace(" \x00", "").replace("\x00", "")
        text = re.sub(r"[ \t]+", " ", text).strip()
        if blocks is not None:
            if state["kind"] == "pre" and state["buf"]:
                pre = "\n".join(state["buf"]).replace("\x00", "").strip("\n")
                if pre.strip():
                    blocks.append(("pre", pre))
            elif state["kind"] == "item" and state["tag"]:
                if text:
                    blocks.append(("item", state["tag"], text))
            elif state["kind"] == "cont" and text and blocks and blocks[-1][0] == "item":
                blocks[-1] = ("item", blocks[-1][1], blocks[-1][2] + " " + text)
            elif text:
                blocks.append(("para", text))
        state.update(kind="para", tag="", buf=[])

    def add_text(text):
        if state["mode"] == "tag":
            state["tag"] = (state["tag"] + ", " + text) if state["tag"] else text
            state["mode"] = "text"
        elif state["mode"] == "tq":
            state["tag"] = state["tag"] + ", " + text
            state["mode"] = "text"
        else:
            state["buf"].append(text)

    skip_until = None
    for line in lines:
        if skip_until:
            if line.startswith(skip_until):
                skip_until = None
            continue
        if line[:1] in ".'" and len(line) > 1:
            m = re.match(r"[.'] *([^ ]+) ?(.*)", line)
            if not m:
                continue
            req, rest = m.group(1), m.group(2)
            if req in ("SH", "SS"):
                flush()
                heading = clean_inline(" ".join(macro_args(rest))).strip()
                if req == "SH":
                    blocks = []
                    sections.append((heading, blocks))
                elif blocks is not None and heading:
                    blocks.append(("sub", heading))
            elif req in ("PP", "P", "LP", "sp", "YS", "HP"):
                if state["kind"] != "pre":
                    flush()
                else:
                    state["buf"].append("")
            elif req == "TP":
                flush()
                state.update(kind="item", mode="tag")
            elif req == "TQ":
                state["mode"] = "tq"
            elif req == "IP":
                flush()
                args = macro_args(rest)
                tag = clean_inline(args[0]).strip() if args else ""
                if tag and tag not in ("\u2022", "*", "-", "o"):
                    state.update(kind="item", tag=tag)
                elif not tag and blocks and blocks[-1][0] == "item":
                    state["kind"] = "cont"
                elif tag:
                    state["buf"].append("\u2022")
            elif req in ("nf", "EX"):
                flush()
                state["kind"] = "pre"
            elif req in ("fi", "EE"):
                flush()
            elif req == "TS":
                flush()
                skip_until = ".TE"
            elif req in ("de", "ig"):
                skip_until = ".."
            elif req in ("B", "I", "SM", "SB"):
                if rest.strip():
                    add_text(clean_inline(" ".join(macro_args(rest))))
            elif req in ALTERNATING:
                add_text(clean_inline("".join(macro_args(rest))))
            elif req in ("UE", "ME"):
                if rest.strip():
                    state["buf"].append("\x00" + clean_inline(rest.strip()))
            elif req == "URL":      # old www.tmac link macro: .URL url [text] [trailer]
                args = macro_args(rest) + ["", ""]
                add_text(clean_inline(args[1] or args[0]) + args[2])
            elif req == "SY":
                flush()
                state["buf"].append(clean_inline(rest))
            elif req == "OP":
                state["buf"].append("[" + clean_inline(" ".join(macro_args(rest))) + "]")
            elif req == "br":
                if state["kind"] == "pre":
                    state["buf"].append("")
            # Everything else (IGNORED_REQUESTS and unknown requests) only affects layout: drop it.
            continue
        if state["kind"] == "pre":
            state["buf"].append(clean_inline(line))
        elif line.strip():
            add_text(clean_inline(line))
    flush()
    names = [b for h, bl in sections[:1] for b in bl if b[0] == "para"]
    if not sections or not names:
        return None
    return Page(names[0][1], sections)


def preprocess_troff(raw):
    """Drop comments and join continuation lines (a trailing backslash or \\c)."""
    out, pending = [], ""
    for line in raw.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\}', "\\\"")) or line.strip() in (".", "'"):
            continue
        line = re.sub(r'(?<!\\)\\".*$', "", line)
        if line.endswith("\\c"):
            pending += line[:-2]
            continue
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending += line[:-1]
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


# ----------------------------------------------------------------------------------------------------------
# Licences
# ----------------------------------------------------------------------------------------------------------
KNOWN_SPDX = {"MIT", "ISC", "Apache-2.0", "PSF-2.0", "MPL-2.0", "Zlib", "0BSD", "Artistic-1.0", "Artistic-2.0",
              "Linux-man-pages-copyleft", "BSD-2-Clause", "BSD-3-Clause", "BSD-4-Clause", "BSD-4-Clause-UC",
              "FSFAP", "FSFULLR", "X11"}


def spdx(name):
    """Debian short licence names (DEP-5) to SPDX-style expressions."""
    parts = re.split(r"\s+(and|or)\s+", name.strip(), flags=re.I)
    out = []
    for p in parts:
        if p.lower() in ("and", "or"):
            out.append(p.upper())
            continue
        m = re.fullmatch(r"(L?GPL|AGPL|GFDL(?:-NIV)?)-(\d(?:\.\d)?)(\+?)", p)
        if m:
            kind, ver, plus = m.groups()
            ver = ver if "." in ver else ver + ".0"
            if kind == "GFDL-NIV":
                out.append(f"GFDL-{ver[:3]}-no-invariants-{'or-later' if plus else 'only'}")
            else:
                out.append(f"{kind}-{ver}-{'or-later' if plus else 'only'}")
            continue
        fixed = {"Expat": "MIT", "public-domain": "LicenseRef-public-domain", "Less": "LicenseRef-Less"}.get(p)
        if fixed:
            out.append(fixed)
        elif re.sub("clause", "Clause", p, flags=re.I) in KNOWN_SPDX:     # Debian writes BSD-3-clause
            out.append(re.sub("clause", "Clause", p, flags=re.I))
        elif re.fullmatch(r"GPL-\d\.\d\+", p):
            out.append(p[:-1] + "-or-later")
        else:
            out.append(p if p in KNOWN_SPDX else "LicenseRef-" + re.sub(r"[^\w.+-]+", "-", p))
    return " ".join(out)


def dep5_stanzas(text):
    stanzas = []
    for chunk in re.split(r"\n\s*\n", text):
        files = re.search(r"^Files:(.*(?:\n[ \t].*)*)", chunk, re.M)
        lic = re.search(r"^License:[ \t]*(.+)", chunk, re.M)
        if files and lic:
            stanzas.append((files.group(1).split(), lic.group(1).strip()))
    return stanzas


class DebianCopyright:
    """A package's machine-readable debian/copyright (DEP-5). A file's licence is an SPDX tag in the file itself,
    else that of the last Files stanza matching its path (later stanzas override earlier ones), else '*'."""

    def __init__(self, text):
        self.stanzas = dep5_stanzas(text)
        self.default = next((lic for pats, lic in reversed(self.stanzas) if "*" in pats), None)

    def licence(self, relpath="", raw=""):
        m = re.search(r"SPDX-License-Identifier:\s*([^\n]+)", raw[:4000])
        if m:
            return m.group(1).strip()
        found = self.default
        if relpath:
            for patterns, lic in self.stanzas:
                if any(p != "*" and (p == relpath or ("*" in p and fnmatch.fnmatchcase(relpath, p)))
                       for p in patterns):
                    found = lic
        return spdx(found) if found else "LicenseRef-see-debian-copyright"


CLASSIFIER_SPDX = {"MIT License": "MIT", "Apache Software License": "Apache-2.0", "ISC License (ISCL)": "ISC",
                   "Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0", "Python Software Foundation License": "PSF-2.0"}


def wheel_licence(meta, licence_files):
    """SPDX-style licence of a wheel: License-Expression, else a short License field or the classifier; a bare
    'BSD' is made precise by reading the licence file the wheel ships."""
    expr = (meta.get("License-Expression") or "").strip()
    if expr:
        return expr
    text = "\n".join(v.decode("utf-8", "replace") for v in licence_files.values())

    def bsd_flavour():
        return "BSD-3-Clause" if "Neither the name" in text or "names of its contributors" in text else "BSD-2-Clause"
    field = (meta.get("License") or "").strip()
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    for value in [field] + classifiers:
        if not value or "\n" in value or len(value) > 40:
            continue
        if value in CLASSIFIER_SPDX:
            return CLASSIFIER_SPDX[value]
        if value in ("BSD", "BSD License", "new BSD License"):
            return bsd_flavour()
        if value in ("Apache 2.0", "Apache License 2.0", "Apache-2.0"):
            return "Apache-2.0"
        if re.fullmatch(r"[\w.+-]+( (AND|OR|WITH) [\w.+-]+)*", value):   # already an SPDX expression
            return value
    return "LicenseRef-see-package-metadata"


# ----------------------------------------------------------------------------------------------------------
# READMEs, release notes, package descriptions
# ----------------------------------------------------------------------------------------------------------
def clean_readme(text, content_type):
    """README (Markdown or reStructuredText) to readable text: no HTML, images, badges or link soup."""
    text = text.replace("\r\n", "\n")
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    if "markdown" in content_type:
        text = re.sub(r"\[!\[[^\]]*\]\([^)]*\)\]\([^)]*\)", "", text)               # linked badges
        text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)                       # images
        text = re.sub(r"\[\s*\]\([^)]*\)", "", text)                            # empty links left over
        text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)                     # [text](url) -> text
        text = re.sub(r"\[([^\]]+)\]\[[^\]]*\]", r"\1", text)
        text = re.sub(r"^\s*\[[^\]]+\]:\s*\S+.*$", "", text, flags=re.M)          # reference definitions
        text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)                             # HTML tags
    else:
        text = re.sub(r"^\.\. (\|[^|]+\| )?(image|figure|raw|include|_[^:]*)::?.*\n(?:[ \t]+.*\n|\s*\n)*",
                      "", text, flags=re.M)
        text = re.sub(r"^\.\. _[^:]+:.*$", "", text, flags=re.M)
        text = re.sub(r"^\.\. (?!.*::).*$", "", text, flags=re.M)                     # comments
        text = re.sub(r"^\.\. (code-block|code|sourcecode)::.*$", "::", text, flags=re.M)
        text = re.sub(r"^\.\. (\w+)::\s*", lambda m: m.group(1).capitalize() + ": ", text, flags=re.M)
        text = re.sub(r"`([^`<]+?)\s*<[^>]+>`__?", r"\1", text)                   # `text <url>`_
        text = re.sub(r"`([^`]+)`__?", r"\1", text)
        text = re.sub(r":[a-z:]+:`~?([^`]+)`", r"`\1`", text)                     # :func:`x`
        text = re.sub(r"\|[\w -]+\|_?", "", text)                                  # substitutions
        text = re.sub(r"^[=\-~^*#+`'\"]{3,}\s*$", "", text, flags=re.M)           # heading adornments
        text = re.sub(r"^\s*::\s*$", "", text, flags=re.M)                          # literal-block markers
        text = re.sub(r"(\S)::$", r"\1:", text, flags=re.M)
        text = text.replace("``", "`")
    text = re.sub(r"^\s*(https?://\S+)\s*$", "", text, flags=re.M)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def gnu_news_releases(text):
    """(release, notes) pairs from a GNU-style NEWS file ('* Noteworthy changes in release X')."""
    parts = re.split(r"^\* (?:Noteworthy|Major) changes in release ([\w.\-]+).*$", text, flags=re.M)
    out = []
    for release, body in zip(parts[1::2], parts[2::2]):
        body = re.sub(r"<https?://[^>]+>|https?://\S+", "", body)
        body = re.sub(r"^\*\* (.+)$", r"\1:", body, flags=re.M)
        paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", textwrap.dedent(body)) if p.strip()]
        paras = [p for p in paras if "\\" not in p and not p.startswith("[")]
        if sum(len(p.split()) for p in paras) >= 30:
            out.append((release, "\n\n".join(paras)))
    return out


def debian_description(desc):
    """The long description of a Debian control Description field, as paragraphs."""
    lines = desc.splitlines()[1:]
    paras, cur = [], []
    for line in lines:
        if line.strip() == ".":
            paras.append(" ".join(cur))
            cur = []
        else:
            cur.append(line.strip())
    paras.append(" ".join(cur))
    return "\n\n".join(p for p in paras if p)


# ----------------------------------------------------------------------------------------------------------
# Python functions
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Fn:
    qualname: str
    lines: list          # dedented source lines (decorators included)
    node: ast.AST
    offset: int          # line number of lines[0] in the file

    @property
    def n_lines(self):
        return len(self.lines)

    def rel(self, lineno):
        return lineno - self.offset

    @property
    def code(self):
        return "\n".join(self.lines)


def functions(text):
    """Module-level functions and methods of module-level classes, dedented, tab-free."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    src = text.splitlines()
    out = []
    for node in tree.body:
        pairs = [(node, node.name)] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
        if isinstance(node, ast.ClassDef):
            pairs = [(n, f"{node.name}.{n.name}") for n in node.body
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for fn, qual in pairs:
            start = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
            body = src[start - 1:fn.end_lineno]
            if any("\t" in line for line in body):
                continue
            out.append(Fn(qual, textwrap.dedent("\n".join(body)).split("\n"), fn, start))
    return out


def docstring_span(fn):
    first = fn.node.body[0]
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
            and isinstance(first.value.value, str):
        return fn.rel(first.lineno), fn.rel(first.end_lineno) + 1
    return None


def completion_head(fn, rng):
    """Signature + docstring (+ sometimes the first body lines) of a function whose body is 3-60 lines."""
    span = docstring_span(fn)
    if not span or len(fn.node.body) < 2:
        return None
    doc = ast.get_docstring(fn.node) or ""
    body_len = fn.n_lines - span[1]
    if len(doc.split()) < 5 or not 3 <= body_len <= 60 or "\\" in "".join(fn.lines[:span[1]]):
        return None
    extra = rng.choice([0, 0, 0, 1, 2, 3]) if body_len >= 12 else 0
    head = fn.lines[:span[1] + extra]
    if "." in fn.qualname:   # a method: show it inside its class, as it appears in the file
        head = [f"class {fn.qualname.split('.')[0]}:", "    ...", ""] + [("    " + line).rstrip() for line in head]
    return "\n".join(head)


ABBREVIATIONS = {"i": "index", "j": "inner", "k": "key", "n": "count", "s": "text", "res": "result",
                 "ret": "result", "buf": "buffer", "val": "value", "tmp": "temp", "msg": "message", "cnt": "count",
                 "idx": "index", "obj": "instance", "fn": "func", "num": "number", "lst": "items", "d": "mapping",
                 "l": "length", "e": "exc", "f": "fobj", "p": "path_obj", "c": "char", "m": "match", "x": "item",
                 "result": "outcome", "data": "payload", "line": "current_line", "lines": "all_lines",
                 "name": "entry_name", "value": "current_value", "path": "target_path", "parts": "pieces",
                 "items": "elements", "key": "lookup_key", "text": "content", "args": "arguments"}


def local_names(fn):
    params = {a.arg for a in ast.walk(fn.node.args) if isinstance(a, ast.arg)}
    stores = name_counts(fn.node, ast.Store)
    loads = name_counts(fn.node, ast.Load)
    return sorted(n for n in stores if n not in params and loads.get(n, 0) + stores[n] >= 3 and n != "self")


def name_counts(node, ctx):
    counts = {}
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ctx):
            counts[n.id] = counts.get(n.id, 0) + 1
    return counts


def append_loop_target(fn):
    """The list built by `for ...: name.append(...)` (the single statement of the loop), if any."""
    for n in ast.walk(fn.node):
        if isinstance(n, ast.For) and len(n.body) == 1 and not n.orelse:
            st = n.body[0]
            if isinstance(st, ast.If) and len(st.body) == 1 and not st.orelse:
                st = st.body[0]
            if isinstance(st, ast.Expr) and isinstance(st.value, ast.Call) \
                    and isinstance(st.value.func, ast.Attribute) and st.value.func.attr == "append" \
                    and isinstance(st.value.func.value, ast.Name):
                return st.value.func.value.id
    return None


def max_if_depth(node, depth=0):
    best = depth
    for child in ast.iter_child_nodes(node):
        d = depth + 1 if isinstance(child, ast.If) else depth
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        best = max(best, max_if_depth(child, d))
    return best


def applicable_edits(fn, rng, split):
    """(group, code, instruction) for up to two edits that make sense for this function."""
    code = fn.code
    a = fn.node.args
    params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
    annotated = any(x.annotation for x in a.posonlyargs + a.args + a.kwonlyargs) or fn.node.returns
    span = docstring_span(fn)
    options = []
    if not annotated and params:
        options.append(("type_hints", code, rng.choice(EDIT_TYPE_HINTS)))
    names = [n for n in local_names(fn) if len(n) >= 1]
    if names:
        old = rng.choice(names)
        new = ABBREVIATIONS.get(old, f"{old}_value" if len(old) > 3 else f"{old}_item")
        if not re.search(rf"\b{re.escape(new)}\b", code):
            options.append(("rename", code, f"Rename the variable `{old}` to `{new}` throughout this function."))
    if span is None:
        options.append(("docstring", code, rng.choice(EDIT_DOCSTRING)))
    elif fn.n_lines - (span[1] - span[0]) >= 20:
        stripped = "\n".join(fn.lines[:span[0]] + fn.lines[span[1]:])
        options.append(("docstring", stripped, rng.choice(EDIT_DOCSTRING)))
    target = append_loop_target(fn)
    if target:
        options.append(("listcomp", code, f"Rewrite the loop that builds `{target}` as a list comprehension."))
    if params:
        p = rng.choice(params)
        options.append(("validation", code, rng.choice(EDIT_VALIDATION).format(param=p)))
    if "os.path." in code:
        options.append(("pathlib", code, "Convert this function to use pathlib instead of os.path. "
                                         "Keep its behaviour the same."))
    if re.search(r"""['"]\s*%\s*[\w(]|\.format\(""", code):
        options.append(("fstrings", code, "Replace the old-style string formatting (% and str.format) in this "
                                          "function with f-strings."))
    options.append(("logging", code, rng.choice(EDIT_LOGGING)))
    options.append(("comments", code, "Add short comments that explain the non-obvious steps of this function. "
                                      "Do not change the code itself."))
    if max_if_depth(fn.node) >= 3:
        options.append(("early_return", code, "Reduce the nesting in this function by using early returns "
                                              "(guard clauses), without changing its behaviour."))
    if split == "train":
        base = fn.node.name
        if not base.startswith("_"):
            options.append(("rename_function", code, f"Rename this function to `{base}_impl` and update any "
                                                     "recursive calls to it."))
        if span:
            options.append(("google_doc", code, "Rewrite the docstring of this function in Google style, with "
                                                "Args:, Returns: and Raises: sections."))
    rng.shuffle(options)
    return options[:2]


EDIT_TYPE_HINTS = ["Add type hints to this function.",
                   "Add type hints to the parameters and the return value of this function.",
                   "Annotate this function with type hints (use the typing module where needed)."]
EDIT_DOCSTRING = ["Add a docstring to this function.",
                  "Write a docstring for this function that describes its parameters and what it returns."]
EDIT_VALIDATION = ["Add input validation at the start of this function that raises ValueError with a clear "
                   "message if `{param}` is None.",
                   "Add input validation: raise ValueError if `{param}` is None or has the wrong type, with a "
                   "helpful message."]
EDIT_LOGGING = ["Add logging to this function: use a module-level `logger = logging.getLogger(__name__)` and "
                "log the arguments at DEBUG level when it is called.",
                "Add debug logging with the logging module at the start and before each return of this function."]
EDIT_LAYOUTS = ["{instruction}\n\n```python\n{code}\n```",
                "```python\n{code}\n```\n\n{instruction}",
                "{instruction} Show the complete updated function.\n\n```python\n{code}\n```"]
COMPLETE = ["Complete this Python function:\n```python\n{code}\n```",
            "Finish the implementation of this Python function. The docstring says what it should do.\n"
            "```python\n{code}\n```",
            "Here is the beginning of a function from `{module}`. Write the rest of it.\n```python\n{code}\n```",
            "Implement the body of this function:\n```python\n{code}\n```",
            "@Fill in the missing code so that this function works as documented:\n```python\n{code}\n```",
            "@Continue this Python code:\n```python\n{code}\n```"]

# ----------------------------------------------------------------------------------------------------------
# Prompt templates
# ----------------------------------------------------------------------------------------------------------
TRANSLATE_TO_ENGLISH = ["Translate this into English:\n\n{text}",
                        "Please translate the following {language} text into English.\n\n{text}",
                        "Translate to English:\n{text}",
                        "What does this say in English? Please give a full translation.\n\n{text}",
                        "@Can you translate this paragraph from {language} to English for me?\n\n{text}"]
TRANSLATE_FROM_ENGLISH = ["Translate the following text into {language}:\n\n{text}",
                          "Translate this into {language}:\n\n{text}",
                          "Please translate this paragraph from a technical manual into {language}.\n\n{text}",
                          "@I need this in {language}. Can you translate it?\n\n{text}"]
SUMMARIZE = {
    "man": ["Summarize the following manual page in a few sentences.\n\n{text}",
            "Here is {title}. Explain in one paragraph what it is about, for someone who has never used "
            "it.\n\n{text}",
            "{text}\n\nSummarize this manual page in five bullet points."],
    "moddoc": ["Summarize this documentation of a Python module in a few sentences.\n\n{text}",
               "{text}\n\nWhat does this module do? Give a short summary."],
    "readme": ["Give me the key points of this README as bullet points.\n\n{text}",
               "Summarize the following README in a short paragraph.\n\n{text}",
               "{text}\n\nBased on this README, what is the project and why would I use it? Keep it brief."],
    "any": ["Summarize the following document in a few sentences.\n\n{text}",
            "TL;DR of this, please:\n\n{text}",
            "@{text}\n\nWrite a three-sentence summary of the text above.",
            "@Read the document below and list its main points.\n\n{text}"],
}
QA_OPTION = ["According to the manual page above, what does the {tag} option of {cmd} do?",
             "What is the {tag} option of {cmd} for, according to this excerpt?",
             "@Based on the text above, what happens when {cmd} is run with {tag}?"]
QA_REVERSE = ["Which option of {cmd} is described as \"{desc}\"?",
              "@Which {cmd} option would I use for this: {desc}?"]
QA_ERROR = ["According to the manual page above, when does {cmd} fail with {tag}?",
            "What does the error {tag} mean for {cmd}, according to this excerpt?",
            "@In which situation does {cmd} report {tag}?"]
QA_ITEM = ["According to the manual page excerpt above, what does {tag} mean for {cmd}?",
           "What does the manual page excerpt say about {tag}?",
           "@Explain {tag} as described in the excerpt above."]
RAG_QUESTIONS = {"option": ["What does the {tag} option of {cmd} do?", "What is {cmd}'s {tag} option for?"],
                 "error": ["When does {cmd} fail with the error {tag}?",
                           "What does {tag} mean when {cmd} returns it?"],
                 "reverse": ["Which option of {cmd} is described as \"{desc}\"?"],
                 "item": ["What does {tag} mean for {cmd}?", "In the {cmd} documentation, what is {tag}?"]}
QA_LAYOUTS = ["{passage}\n\n{question}",
              "Read this excerpt and answer the question.\n\n{passage}\n\nQuestion: {question}",
              "{question} Answer from the text below.\n\n{passage}"]
RAG_INSTRUCTIONS = ["Answer the question using the passages above and cite the passage number.",
                    "Using only the passages above, answer the question. Cite the passage you used, like [2].",
                    "Answer the question based on the passages above. Say which passage the answer comes from.",
                    "@Answer briefly, using the passages above, and cite the passage number in brackets."]
MATH_SUFFIXES = ["Solve step by step.", "Show your work step by step.", "Explain your reasoning step by step, "
                 "then give the final answer.", "Work it out step by step."]

# Chat: (template, kind of source text it needs). '{what}' is a NAME-line description, '{text}' a paragraph.
CHAT = {
    "fit_command": ["I need to {what}. Is {name} a good fit, and how would I start?",
                    "@I want to {what} on a Linux machine. Would {name} do that? Give me a first example."],
    "fit_function": ["I'm writing a C program and need {what}. Is {name}() the right function, and how would I "
                     "start?"],
    "compare": ["What's the difference between {a} and {b}? From their man pages: {a} is for \"{wa}\" and {b} "
                "is for \"{wb}\". When would I use each?"],
    "fit_pypi": ["I'm looking for a Python library for this: \"{summary}\". Is {pkg} a good fit, and how do I "
                 "get started?"],
    "tweet": ["Write a tweet (under 280 characters) announcing {pkg}, a Python package described as \"{summary}\"."],
    "email": ["Write a short email to my team suggesting we try {pkg} ({summary}). Keep it under 120 words."],
    "poem": ["Write a short, light-hearted poem about {pkg}, a Python library whose tagline is \"{summary}\".",
             "@Write a limerick about {pkg} (\"{summary}\")."],
    "product": ["Write a product description for {pkg}, based on its package description:\n\n{desc}",
                "@Write a two-sentence elevator pitch for {pkg} from this description:\n\n{desc}"],
    "stdlib": ["I'm writing a Python script. Would the standard library's {module} module help? Its "
               "documentation starts: \"{first}\" How would I start using it?"],
    "announce": ["Write a short announcement for the release notes below.\n\n{notes}",
                 "@Draft a short blog post announcing this release, based on the notes below.\n\n{notes}"],
    "users": ["My users aren't technical. Explain in two or three sentences what changed in {title}, based on "
              "these notes:\n\n{notes}"],
    "friendlier": ["Rewrite this paragraph to be friendlier and easier to read:\n\n{text}",
                   "@Rewrite this in a more formal tone:\n\n{text}"],
    "shorter": ["Make this text shorter without losing anything important:\n\n{text}"],
    "plain": ["Can you explain this in plain words, for someone who doesn't program?\n\n{text}"],
    "faq": ["Turn this paragraph into a short FAQ with two or three questions and answers:\n\n{text}",
            "@Write three quiz questions, with answers, that check understanding of this paragraph:\n\n{text}"],
    "titles": ["Suggest five titles for a blog post based on this paragraph:\n\n{text}"],
}
VERBS = set("""add adjust allocate build calculate change check clear close collect compare compress concatenate
configure control convert copy count create decompress delete determine display dump edit execute extract
filter find format generate get install join kill list locate look make manage merge modify monitor mount move
number open output print query read remove rename report reverse run search send set show shrink sort split
strip test trace translate truncate unmount update view wait wrap write""".split())


def is_verb_phrase(what):
    return what.split()[0].lower() in VERBS if what.split() else False


# ----------------------------------------------------------------------------------------------------------
# Math word problems: original templates (no public benchmark used). Answers are checked to be integers.
# ----------------------------------------------------------------------------------------------------------
NAMES = ["Amara", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam",
         "Maya", "Nikhil", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tess", "Umar", "Vera", "Wen", "Yusuf", "Zoe"]
PRONOUN = {n: ("she" if n in {"Amara", "Chloe", "Elena", "Grace", "Ines", "Kemi", "Maya", "Olga", "Rosa", "Tess",
                              "Vera", "Wen", "Zoe"} else "he") for n in NAMES}


def _name(rng, k=1):
    picks = rng.sample(NAMES, k)
    return picks if k > 1 else picks[0]


def m_bakery(rng):
    n, item = _name(rng), rng.choice(["muffins", "rolls", "cookies", "scones"])
    trays, per, box = rng.randint(3, 9), rng.randint(6, 16), rng.choice([4, 6, 8])
    sold = rng.randint(1, trays * per // 2)
    sold += (trays * per - sold) % box
    return (f"{n} bakes {trays} trays of {item} with {per} {item} on each tray. {PRONOUN[n].capitalize()} sells "
            f"{sold} of them at the market and packs the rest into boxes of {box}. How many boxes does "
            f"{PRONOUN[n]} fill?", (trays * per - sold) // box)


def m_garden(rng):
    n, plant = _name(rng), rng.choice(["tomato", "lettuce", "pepper", "bean"])
    rows, per, eaten, more = rng.randint(3, 12), rng.randint(5, 15), rng.randint(2, 9), rng.randint(4, 20)
    return (f"{n} plants {rows} rows of {plant} seedlings with {per} seedlings in each row. Snails eat {eaten} of "
            f"the seedlings, so {n} plants {more} new ones. How many {plant} seedlings are in the garden now?",
            rows * per - eaten + more)


def m_tickets(rng):
    adult, child = rng.randint(8, 30), rng.randint(3, 12)
    na, nc = rng.randint(1, 5), rng.randint(1, 6)
    place = rng.choice(["the coast", "the city museum", "the mountains", "a science fair"])
    return (f"A one-way train ticket to {place} costs ${adult} for an adult and ${child} for a child. A family "
            f"of {na} adult{'s' if na > 1 else ''} and {nc} child{'ren' if nc > 1 else ''} buys tickets for the "
            f"trip there and back. How much do they pay in "
            f"total?", 2 * (adult * na + child * nc))


def m_savings(rng):
    n, thing = _name(rng), rng.choice(["bicycle", "guitar", "tablet", "telescope", "pair of skates"])
    weekly, weeks = rng.choice([5, 8, 10, 12, 15, 20]), rng.randint(3, 15)
    saved = rng.randint(10, 90)
    price = saved + weekly * weeks
    return (f"{n} wants a {thing} that costs ${price}. {PRONOUN[n].capitalize()} already has ${saved} and saves "
            f"${weekly} every week. How many weeks will it take until {PRONOUN[n]} has exactly enough?", weeks)


def m_library(rng):
    shelves, per = rng.randint(4, 12), rng.randint(20, 45)
    out = rng.randint(10, 60)
    back = rng.randint(1, out)
    return (f"A school library has {shelves} shelves with {per} books on each shelf. On Monday students borrow "
            f"{out} books, and on Friday they return {back} of them. How many books are on the shelves after "
            f"Friday?", shelves * per - out + back)


def m_paint(rng):
    n = _name(rng)
    walls, h, length, cover = rng.randint(2, 6), rng.randint(2, 3), rng.randint(3, 8), rng.choice([5, 6, 8, 10])
    area = walls * h * length
    return (f"{n} is painting {walls} walls. Each wall is {h} metres high and {length} metres long. One can of "
            f"paint covers {cover} square metres. How many cans does {PRONOUN[n]} need to buy to paint every wall "
            f"once?", math_ceil(area, cover))


def math_ceil(a, b):
    return -(-a // b)


def m_fruit(rng):
    n = _name(rng)
    a, p, b, q = rng.randint(2, 6), rng.randint(2, 5), rng.randint(1, 5), rng.randint(3, 7)
    cost = a * p + b * q
    bill = 20 if cost < 20 else 50 if cost < 50 else 100
    return (f"{n} buys {a} kilograms of apples at ${p} per kilogram and {b} kilograms of pears at ${q} per "
            f"kilogram. {PRONOUN[n].capitalize()} pays with a ${bill} bill. How much change does "
            f"{PRONOUN[n]} get?", bill - a * p - b * q)


def m_reading(rng):
    n = _name(rng)
    p, d, q, e = rng.randint(10, 30), rng.randint(2, 6), rng.randint(15, 40), rng.randint(2, 5)
    total = p * d + q * e + rng.randint(5, 120)
    return (f"{n}'s book has {total} pages. {PRONOUN[n].capitalize()} reads {p} pages a day for {d} days, then "
            f"{q} pages a day for the next {e} days. How many pages are left to read?", total - p * d - q * e)


def m_party(rng):
    n = _name(rng)
    guests, cups, pack, spare = rng.randint(8, 30), rng.randint(2, 3), rng.choice([10, 12, 20]), rng.randint(0, 6)
    need = guests * cups + spare
    return (f"{n} is hosting a party for {guests} guests and expects each guest to use {cups} paper cups. "
            f"{PRONOUN[n].capitalize()} also wants {spare} spare cups. Cups are sold in packs of {pack}. How many "
            f"packs should {PRONOUN[n]} buy?", math_ceil(need, pack))


def m_bus(rng):
    start, off1, on1 = rng.randint(20, 45), rng.randint(2, 10), rng.randint(3, 15)
    after = start - off1 + on1
    if after % 2:
        on1 += 1
        after += 1
    return (f"A bus leaves the depot with {start} passengers. At the first stop {off1} people get off and {on1} "
            f"get on. At the second stop, half of the passengers get off and nobody gets on. How many passengers "
            f"are on the bus now?", after // 2)


def m_marbles(rng):
    a, b = _name(rng, 2)
    times, friends = rng.randint(2, 4), rng.choice([2, 3, 4, 5])
    x = rng.randint(6, 25)
    while x * (1 + times) % friends:      # keep the fair share a whole number
        x += 1
    return (f"{a} has {x} marbles and {b} has {times} times as many. They put all their marbles together and "
            f"share them equally among {friends} friends. How many marbles does each friend get?",
            x * (1 + times) // friends)


def m_factory(rng):
    per_hour, hours, days, faulty = rng.randint(12, 60), rng.randint(6, 10), rng.randint(3, 6), rng.randint(5, 40)
    item = rng.choice(["bottles", "bolts", "toy cars", "notebooks"])
    return (f"A machine makes {per_hour} {item} per hour. It runs {hours} hours a day for {days} days. "
            f"{faulty} of the {item} are faulty and are thrown away. How many good {item} are left?",
            per_hour * hours * days - faulty)


def m_laps(rng):
    n = _name(rng)
    track, l1, l2 = rng.choice([200, 250, 400]), rng.randint(3, 10), rng.randint(4, 12)
    return (f"A running track is {track} metres around. {n} runs {l1} laps on Monday and {l2} laps on Tuesday. "
            f"How many metres does {PRONOUN[n]} run on the two days together?", track * (l1 + l2))


def m_recipe(rng):
    n = _name(rng)
    serv, flour, mult = rng.choice([2, 4, 6]), rng.choice([150, 200, 250, 300]), rng.randint(2, 4)
    have = rng.randint(5, flour * mult // 10 - 5) * 10
    return (f"A pancake recipe for {serv} people uses {flour} grams of flour. {n} wants to make pancakes for "
            f"{serv * mult} people and has {have} grams of flour at home. How many more grams of flour does "
            f"{PRONOUN[n]} need?", flour * mult - have)


def m_phone(rng):
    n = _name(rng)
    base, extra, inc, months = rng.randint(10, 25), rng.randint(2, 5), rng.randint(2, 10), rng.randint(2, 6)
    used = inc + rng.randint(1, 6)
    return (f"{n}'s phone plan costs ${base} a month and includes {inc} GB of data; each extra GB costs ${extra}. "
            f"{n} uses {used} GB every month. How much does {PRONOUN[n]} pay in total for {months} months?",
            months * (base + extra * (used - inc)))


def m_vans(rng):
    classes, students, van = rng.randint(2, 6), rng.randint(18, 30), rng.choice([8, 12, 15])
    teachers = rng.randint(1, 2)
    people = classes * (students + teachers)
    return (f"A school takes {classes} classes on a trip. Each class has {students} students and {teachers} "
            f"teacher{'s' if teachers > 1 else ''}. Everyone rides in vans that seat {van} people each. How many "
            f"vans are needed?", math_ceil(people, van))


def m_stamps(rng):
    n = _name(rng)
    third, bought = rng.randint(5, 30), rng.randint(3, 25)
    start = third * 3
    return (f"{n} had {start} stamps. {PRONOUN[n].capitalize()} gave a third of them to a cousin, then bought "
            f"{bought} more. Later a neighbour doubled the collection by giving {n} as many stamps as "
            f"{PRONOUN[n]} had. How many stamps does {n} have now?", 2 * (start - third + bought))


def m_orchard(rng):
    trees, fruit, k, crate = rng.randint(5, 20), rng.randint(20, 60), rng.choice([5, 10]), rng.choice([10, 12, 25])
    fruit = fruit // k * k
    good = trees * fruit - trees * fruit // k
    return (f"An orchard has {trees} pear trees, and each tree gives {fruit} pears. One in every {k} pears is "
            f"bruised and thrown away. The rest are packed into crates of {crate}. How many crates can be filled "
            f"completely?", good // crate)


def m_parking(rng):
    n = _name(rng)
    first, nxt, start = rng.randint(3, 6), rng.randint(1, 4), rng.randint(7, 11)
    hours = rng.randint(2, 7)
    end = start + hours
    fmt = lambda h: "noon" if h == 12 else f"{h if h < 12 else h - 12} {'a.m.' if h < 12 else 'p.m.'}"
    return (f"Parking in town costs ${first} for the first hour and ${nxt} for each extra hour. {n} parks from "
            f"{fmt(start)} until {fmt(end)} on the same day. How much does {PRONOUN[n]} pay?",
            first + nxt * (hours - 1))


MATH_HELDOUT = {"bakery": m_bakery, "garden": m_garden, "tickets": m_tickets, "savings": m_savings,
                "library": m_library, "paint": m_paint}
MATH_TRAIN = {"fruit": m_fruit, "reading": m_reading, "party": m_party, "bus": m_bus, "marbles": m_marbles,
              "factory": m_factory, "laps": m_laps, "recipe": m_recipe, "phone": m_phone, "vans": m_vans,
              "stamps": m_stamps, "orchard": m_orchard, "parking": m_parking}


def math_templates(split):
    return MATH_HELDOUT if split == "heldout" else MATH_TRAIN
