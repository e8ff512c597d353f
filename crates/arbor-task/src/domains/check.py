# arbor built-in domain checker: uploaded to /tests after the agent has
# finished and run as `python3 -I -S /tests/check.py /tests/spec.json`.
# Exit 0 = every check passed; otherwise prints the first failure and exits 1.
import json
import sys
from html.parser import HTMLParser


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as e:
        fail("cannot read %s: %s" % (path, e))


def lines_of(text):
    ls = [l.rstrip() for l in text.replace("\r\n", "\n").split("\n")]
    while ls and ls[-1] == "":
        ls.pop()
    return ls


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag, attrs, parent):
        self.tag, self.attrs, self.parent = tag, dict(attrs), parent
        self.children, self.text = [], []

    def all_text(self):
        return " ".join(" ".join(self.text_parts()).split())

    def text_parts(self):
        out = list(self.text)
        for c in self.children:
            out.extend(c.text_parts())
        return out

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()


class Tree(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", [], None)
        self.cur = self.root

    def handle_starttag(self, tag, attrs):
        n = Node(tag, [(k, v if v is not None else "") for k, v in attrs], self.cur)
        self.cur.children.append(n)
        if tag not in VOID:
            self.cur = n

    def handle_startendtag(self, tag, attrs):
        n = Node(tag, [(k, v if v is not None else "") for k, v in attrs], self.cur)
        self.cur.children.append(n)

    def handle_endtag(self, tag):
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.text.append(data)


def find(root, tag=None, id=None, cls=None):
    out = []
    for n in root.walk():
        if tag and n.tag != tag:
            continue
        if id and n.attrs.get("id") != id:
            continue
        if cls and cls not in n.attrs.get("class", "").split():
            continue
        if n.tag != "#root":
            out.append(n)
    return out


def check_html(path, checks):
    p = Tree()
    p.feed(read(path))
    p.close()
    root = p.root
    for c in checks:
        k = c["k"]
        if k == "title":
            t = find(root, "title")
            if not t or t[0].all_text() != c["text"]:
                fail("title must be %r" % c["text"])
        elif k == "heading":
            hs = find(root, c["tag"])
            if len(hs) != 1 or hs[0].all_text() != c["text"]:
                fail("exactly one <%s> reading %r required" % (c["tag"], c["text"]))
        elif k == "list":
            ls = find(root, c["tag"], id=c["id"])
            if len(ls) != 1:
                fail("one <%s id=%s> required" % (c["tag"], c["id"]))
            items = [x for x in ls[0].children if x.tag == "li"]
            if len(items) != len(c["items"]) or [x.all_text() for x in items] != c["items"]:
                fail("list %s must hold items %r" % (c["id"], c["items"]))
        elif k == "table":
            ts = find(root, "table", id=c["id"])
            if len(ts) != 1:
                fail("one <table id=%s> required" % c["id"])
            rows = find(ts[0], "tr")
            if len(rows) != c["rows"]:
                fail("table %s must have %d rows" % (c["id"], c["rows"]))
            for r in rows:
                cells = [x for x in r.children if x.tag in ("td", "th")]
                if len(cells) != c["cols"]:
                    fail("every row of table %s must have %d cells" % (c["id"], c["cols"]))
            if c.get("header"):
                ths = [x.all_text() for x in rows[0].children if x.tag == "th"]
                if ths != c["header"]:
                    fail("first row of table %s must be header cells %r" % (c["id"], c["header"]))
        elif k == "link":
            ok = any(a.attrs.get("href") == c["href"] and a.all_text() == c["text"] for a in find(root, "a"))
            if not ok:
                fail("a link to %s reading %r required" % (c["href"], c["text"]))
        elif k == "form":
            fs = find(root, "form", id=c["id"])
            if len(fs) != 1:
                fail("one <form id=%s> required" % c["id"])
            names = {i.attrs.get("name"): i.attrs.get("type", "text") for i in find(fs[0], "input")}
            for name, typ in c["inputs"]:
                if names.get(name) != typ:
                    fail("form %s needs an input name=%s type=%s" % (c["id"], name, typ))
            if c.get("action") and fs[0].attrs.get("action") != c["action"]:
                fail("form %s must have action=%s" % (c["id"], c["action"]))
        elif k == "class_count":
            n = len(find(root, c["tag"], cls=c["cls"]))
            if n != c["n"]:
                fail("exactly %d <%s class=%s> elements required, found %d" % (c["n"], c["tag"], c["cls"], n))
        elif k == "img_alt":
            imgs = find(root, "img")
            if len(imgs) != c["n"] or any(not i.attrs.get("alt", "").strip() for i in imgs):
                fail("exactly %d images, each with a non-empty alt, required" % c["n"])
        elif k == "lang":
            h = find(root, "html")
            if not h or h[0].attrs.get("lang") != c["lang"]:
                fail("<html lang=%s> required" % c["lang"])
        elif k == "no_tag":
            if find(root, c["tag"]):
                fail("no <%s> elements allowed" % c["tag"])
        else:
            fail("unknown html check %r" % k)


def check_text(path, c):
    text = read(path)
    ls = lines_of(text)
    body = [l for l in ls]
    if "line_count" in c and len(body) != c["line_count"]:
        fail("expected %d lines, found %d" % (c["line_count"], len(body)))
    if "prefix" in c:
        for l in body[: c.get("prefix_lines", len(body))]:
            if not l.startswith(c["prefix"]):
                fail("every line must start with %r" % c["prefix"])
    for w in c.get("contains", []):
        if w.lower() not in text.lower():
            fail("must mention %r" % w)
    for w in c.get("forbid", []):
        if w in text:
            fail("must not contain %r" % w)
    if c.get("lowercase") and text != text.lower():
        fail("must be all lowercase")
    if c.get("uppercase") and text != text.upper():
        fail("must be all uppercase")
    if "max_line_len" in c and any(len(l) > c["max_line_len"] for l in body):
        fail("lines must be at most %d characters" % c["max_line_len"])
    if "last_line" in c and (not body or body[-1].strip() != c["last_line"]):
        fail("last line must be %r" % c["last_line"])
    if "first_word" in c:
        words = text.split()
        if not words or words[0].strip(".,;:!?").lower() != c["first_word"].lower():
            fail("must start with the word %r" % c["first_word"])
    if "words" in c:
        n = len(text.split())
        lo, hi = c["words"]
        if not lo <= n <= hi:
            fail("word count %d not in [%d, %d]" % (n, lo, hi))
    if "json_keys" in c:
        try:
            v = json.loads(text)
        except ValueError:
            fail("must be a JSON object")
        if not isinstance(v, dict) or sorted(v.keys()) != sorted(c["json_keys"]):
            fail("JSON object must have exactly the keys %r" % c["json_keys"])


def main():
    spec = json.loads(read(sys.argv[1]))
    for c in spec["checks"]:
        t = c["t"]
        if t == "lines":
            got = lines_of(read(c["path"]))
            if got != c["lines"]:
                fail("%s: expected %d lines %r..., got %d lines %r..." % (c["path"], len(c["lines"]), c["lines"][:3], len(got), got[:3]))
        elif t == "number":
            s = read(c["path"]).strip().replace(",", "")
            try:
                x = float(s)
            except ValueError:
                fail("%s: not a number: %r" % (c["path"], s[:80]))
            if abs(x - c["value"]) > c.get("tol", 1e-9):
                fail("%s: wrong value" % c["path"])
        elif t == "exists":
            read(c["path"])
        elif t == "absent":
            try:
                open(c["path"]).close()
                fail("%s must not exist" % c["path"])
            except OSError:
                pass
        elif t == "contains":
            if c["needle"] not in read(c["path"]):
                fail("%s must contain %r" % (c["path"], c["needle"]))
        elif t == "not_contains":
            if c["needle"] in read(c["path"]):
                fail("%s must not contain %r" % (c["path"], c["needle"]))
        elif t == "html":
            check_html(c["path"], c["checks"])
        elif t == "text":
            check_text(c["path"], c)
        else:
            fail("unknown check %r" % t)
    print("OK")


main()
