#!/usr/bin/env python3
"""Caps a fuzz corpus to what is worth committing.

`cargo fuzz cmin` keeps every input that adds a libFuzzer feature (edge hit
counts included), which for the JSON targets is thousands of files. This
keeps every hand-made seed (a file whose name is not a 40-hex content hash),
drops hash-named copies of them, then adds greedily the input that covers the
most edges not covered yet (the smaller on a tie) until nothing adds an edge
or the budget is reached. It prints how many edges the kept files cover.

usage: fuzz/cap_corpus.py TARGET [MAX_FILES [MAX_BYTES]]   (default 45, 190000)

Needs the target built: RUSTC_BOOTSTRAP=1 cargo fuzz build TARGET.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

MAX_FILE_BYTES = 64 * 1024
HERE = os.path.dirname(os.path.abspath(__file__))


def edges_of(binary, path):
    """The edges one input covers: a one-file libFuzzer merge reports them."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out, ctl = os.path.join(tmp, "in"), os.path.join(tmp, "out"), os.path.join(tmp, "ctl")
        os.mkdir(src)
        os.mkdir(out)
        shutil.copy(path, src)
        subprocess.run([binary, "-merge=1", f"-merge_control_file={ctl}", out, src],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        with open(ctl) as f:
            for line in f:
                if line.startswith("COV "):
                    return set(line.split()[2:])
    return set()


def main():
    target = sys.argv[1]
    max_files = int(sys.argv[2]) if len(sys.argv) > 2 else 45
    max_bytes = int(sys.argv[3]) if len(sys.argv) > 3 else 190000
    corpus = os.path.join(HERE, "corpus", target)
    binary = os.path.join(HERE, "target", "x86_64-unknown-linux-gnu", "release", target)
    content = lambda p: open(p, "rb").read()
    names = sorted(os.listdir(corpus))
    seeds = [n for n in names if not re.fullmatch(r"[0-9a-f]{40}", n)]
    seed_hashes = {hashlib.sha1(content(os.path.join(corpus, n))).hexdigest() for n in seeds}
    others = [n for n in names if n not in seeds and n not in seed_hashes]
    for n in names:
        if n not in seeds and n in seed_hashes:
            os.remove(os.path.join(corpus, n))
    cov = {n: edges_of(binary, os.path.join(corpus, n)) for n in seeds + others}
    size = {n: os.path.getsize(os.path.join(corpus, n)) for n in seeds + others}
    covered = set().union(*(cov[n] for n in seeds)) if seeds else set()
    kept, total = list(seeds), sum(size[n] for n in seeds)
    seed_edges = len(covered)
    while len(kept) < max_files:
        best = None
        for n in others:
            if n in kept or size[n] > MAX_FILE_BYTES or total + size[n] > max_bytes:
                continue
            gain = len(cov[n] - covered)
            if gain and (best is None or (gain, -size[n]) > best[0]):
                best = ((gain, -size[n]), n)
        if best is None:
            break
        kept.append(best[1])
        covered |= cov[best[1]]
        total += size[best[1]]
    for n in others:
        if n not in kept:
            os.remove(os.path.join(corpus, n))
    every = set().union(*cov.values()) if cov else set()
    print(f"{target}: {len(names)} files -> {len(kept)} ({len(seeds)} seeds), {total} bytes; "
          f"edges covered {len(covered)} of {len(every)} (seeds alone {seed_edges})")


if __name__ == "__main__":
    main()
