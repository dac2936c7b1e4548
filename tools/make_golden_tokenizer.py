#!/usr/bin/env python
"""Generate the tokenizer golden files from the upstream sentencepiece / transformers code.

Run ONCE in an environment with ``sentencepiece``, ``protobuf`` and a transformers 4.x
(never needed by radtrt at runtime).  The committed goldens were produced with::

    /work/goldenvenv_pin/bin/python tools/make_golden_tokenizer.py \
        --also-python /work/goldenvenv/bin/python

i.e. primary results from transformers==4.31.0 (the version LLaVA-Rad pins), cross-checked
against a newer 4.x (4.44.2); the cross-check outcome is stored in the JSON.

Writes (relative to the repo root):

  tests/golden/tiny_llama_sp.model   tiny LLaMA-style sentencepiece BPE model (only
                                     trained when missing or with --train)
  tests/golden/tokenizer_golden.json golden ids / strings (see the "layout" key)

Options:
  --train            retrain the .model even if it exists
  --emit-only        print this interpreter's results as JSON on stdout, write nothing
  --also-python PY   run PY --emit-only and record differences against it
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("GOLDEN_OUT", ROOT / "tests" / "golden"))
MODEL_PATH = OUT / "tiny_llama_sp.model"
JSON_PATH = OUT / "tokenizer_golden.json"

IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
QUERY = "Provide a description of the findings in the radiology image."
QUERY_IND = "Provide a description of the findings in the radiology image given the following indication: {indication}"

# ----------------------------------------------------------------------------------------
# trainer settings: those of Meta's LLaMA tokenizer.model trainer_spec / normalizer_spec,
# except vocab_size (tiny) and character_coverage (LLaMA: 0.99995; 1.0 here so every
# training character is a piece).  Characters absent from the corpus (é, —, ...) go
# through byte fallback.
TRAINER_KWARGS = dict(
    model_type="bpe",
    vocab_size=600,
    character_coverage=1.0,
    byte_fallback=True,
    split_digits=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    treat_whitespace_as_suffix=False,
    allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16,
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    unk_piece="<unk>",
    bos_piece="<s>",
    eos_piece="</s>",
    vocabulary_output_piece_score=True,
    hard_vocab_limit=True,
    shuffle_input_sentence=False,
    num_threads=1,
    self_test_sample_size=0,
)


def corpus_lines(n: int = 400) -> list[str]:
    rng = random.Random(1234)
    organs = ["lungs", "lung volumes", "cardiac silhouette", "mediastinal contours", "hilar contours",
              "osseous structures", "pulmonary vasculature", "costophrenic angles", "hemidiaphragms"]
    states = ["are clear", "are normal", "are within normal limits", "are unremarkable", "are stable",
              "are low", "are grossly intact", "are well expanded"]
    findings = ["pleural effusion", "pneumothorax", "focal consolidation", "pulmonary edema",
                "pneumonia", "atelectasis", "cardiomegaly", "free air below the diaphragm",
                "acute osseous abnormality", "nodule", "mass", "emphysema", "interstitial opacity"]
    sides = ["left", "right", "bilateral", "left basilar", "right upper lobe", "retrocardiac",
             "right middle lobe", "left lower lobe"]
    sev = ["small", "moderate", "large", "mild", "minimal", "trace"]
    devices = ["endotracheal tube", "nasogastric tube", "right internal jugular central venous catheter",
               "left-sided pacemaker", "PICC line", "sternotomy wires", "surgical clips"]
    templates = [
        "The {o} {s}.",
        "No {f} or {f2}.",
        "There is no {f}, {f2}, or {f3}.",
        "Heart size is normal.",
        "Heart size is {sv}ly enlarged.",
        "{Sv} {sd} {f} is seen.",
        "There is a {sv} {sd} {f}.",
        "{Sv} {sd} opacity may reflect {f} or {f2}.",
        "The {d} terminates {n} cm above the carina.",
        "The {d} is in unchanged position.",
        "Compared to the prior study from {m}/{dd}/{y}, there is no significant change.",
        "A {n} mm nodule is noted in the {sd} lung.",
        "{n}M with {k} days of cough and fever.",
        "{n}F with shortness of breath, evaluate for {f}.",
        "History: {n}-year-old with chest pain.",
        "Indication: r/o {f}.",
        "Findings: The {o} {s}. No {f}.",
        "Impression: No acute cardiopulmonary process.",
        "Degenerative changes are seen in the thoracic spine.",
        "Patient is status post CABG.",
        "USER: Provide a description of the findings in the radiology image. ASSISTANT: The {o} {s}.",
    ]
    lines = [SYSTEM, QUERY, QUERY_IND.format(indication="cough"),
             "Provide a description of the findings in the radiology image given the following indication:",
             "USER:", "ASSISTANT:", "The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal."]
    while len(lines) < n:
        k = rng.randint(1, 3)
        sent = []
        for _ in range(k):
            t = rng.choice(templates)
            fs = rng.sample(findings, 3)
            sv = rng.choice(sev)
            sent.append(t.format(o=rng.choice(organs), s=rng.choice(states), f=fs[0], f2=fs[1], f3=fs[2],
                                 sv=sv, Sv=sv.capitalize(), sd=rng.choice(sides), d=rng.choice(devices),
                                 n=rng.randint(1, 95), k=rng.randint(1, 14), m=rng.randint(1, 12),
                                 dd=rng.randint(1, 28), y=rng.randint(2005, 2023)))
        lines.append(" ".join(sent))
    return lines


def train_model(path: Path) -> None:
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_lines()), model_writer=buf, **TRAINER_KWARGS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


# ----------------------------------------------------------------------------------------
# Verbatim from microsoft/LLaVA-Rad llava/mm_utils.py (Apache-2.0).
def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX, return_tensors=None):
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split('<image>')]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep]*len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])

    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])

    if return_tensors is not None:
        if return_tensors == 'pt':
            import torch
            return torch.tensor(input_ids, dtype=torch.long)
        raise ValueError(f'Unsupported tensor type: {return_tensors}')
    return input_ids


def v1_prompt(query: str) -> str:
    """conv_vicuna_v1 (sep_style TWO, sep ' ', sep2 '</s>') with one user turn + open assistant turn."""
    return SYSTEM + " " + "USER: " + DEFAULT_IMAGE_TOKEN + "\n" + query + " " + "ASSISTANT:"


def eval_path_prompt(query_value: str) -> str:
    """What llava/eval/model_mimic_cxr.py builds from a conversation value '<image>\\n...'."""
    q = query_value.replace("<image>", "").strip()
    q = DEFAULT_IMAGE_TOKEN + "\n" + q
    return SYSTEM + " " + "USER: " + q + " " + "ASSISTANT:"


INDICATIONS = [
    "cough",
    "65M with 3 days of cough",
    "Dyspnée, r/o pneumonia — émphysème?",
    "  leading spaces",
    "trailing spaces  ",
    "double  spaces  inside",
    "line one\nline two",
    "\nleading newline",
    "",
    "ETT placement 2024-01-15, r/o PTX (1.5 cm?)",
    "胸痛",
    "tab\there",
    "sob </s> after eos",
]


def image_prompt_cases():
    cases = [{"name": "v1_findings", "prompt": v1_prompt(QUERY)}]
    for i, ind in enumerate(INDICATIONS):
        cases.append({"name": f"v1_indication_{i}", "indication": ind,
                      "prompt": v1_prompt(QUERY_IND.format(indication=ind))})
    cases.append({"name": "plain_image_newline", "prompt": "<image>\n"})
    cases.append({"name": "plain_image_only", "prompt": "<image>"})
    cases.append({"name": "plain_image_text", "prompt": "<image>\nThe lungs are clear."})
    cases.append({"name": "no_image", "prompt": "USER: hello ASSISTANT:"})
    cases.append({"name": "two_images", "prompt": "<image>\nCompare with <image> please."})
    # prompts exactly as model_mimic_cxr.py builds them from a dataset conversation value
    for i, ind in enumerate(["  65M with cough  ", "line one\nline two "]):
        val = f"<image>\nProvide a description of the findings in the radiology image given the following indication: {ind}"
        cases.append({"name": f"eval_path_{i}", "conversation_value": val, "prompt": eval_path_prompt(val)})
    return cases


ENCODE_TEXTS = [
    "The lungs are clear.",
    " The lungs are clear.",
    "  two leading spaces",
    "trailing space ",
    "Heart size is normal.</s>",
    "Heart size is normal.</s> No effusion.",
    "Heart size is normal.</s>No effusion.",
    "<s>The lungs",
    "\nProvide a description",
    "\n",
    " ",
    "",
    "65M with 3 days of cough 2024",
    "Dyspnée — émphysème?",
    "▁already has underline",
    "ASSISTANT:",
    " ASSISTANT:",
    "<unk>",
]

ENCODE_EXTRA_TOKENS = ["▁", "▁The", "▁lungs", "▁are", "▁clear", ".", "<0x0A>", "<0xC3>", "<0xA9>",
                       "<0xE2>", "<0x80>", "<0x94>", "▁No", "▁pleural", "▁effusion", "</s>", "<s>", "<unk>"]


def decode_id_lists(tok):
    ids = []

    def enc(t):
        return tok(t, add_special_tokens=False).input_ids

    v = tok.convert_tokens_to_ids
    ids.append(enc("The lungs are clear. No pleural effusion or pneumothorax."))
    ids.append(enc("The lungs are clear.") + [2])
    ids.append([1] + enc("Heart size is normal.") + [2])
    ids.append(enc("Dyspnée — émphysème?") + [2])
    ids.append(enc("line one\nline two") + [2])
    ids.append(v(["▁", "<0x0A>"]) + enc("The lungs"))
    ids.append(v(["<0xC3>", "<0xA9>"]))                 # complete UTF-8 sequence via bytes
    ids.append(v(["<0xC3>"]))                           # dangling lead byte
    ids.append(v(["▁The", "<0xE2>", "<0x80>", "<0x94>", "▁lungs"]))
    ids.append(v(["<unk>", "▁The"]))
    ids.append([2])
    ids.append([])
    ids.append(enc("No effusion.") + [2] + enc("Extra after eos."))
    ids.append(v(["▁", "▁", "▁The"]) + [2, 2])
    ids.append(enc("65M with 3 days of cough") + [2])
    return ids


def make_tokenizer(model_path: Path, legacy: bool, how: str):
    """how='vicuna_dir': AutoTokenizer.from_pretrained(dir, use_fast=False) on a directory laid out
    like lmsys/vicuna-7b-v1.5 (its tokenizer_config.json values, with "legacy" set as given);
    how='direct': LlamaTokenizer(vocab_file=..., legacy=...)."""
    from transformers import AutoTokenizer, LlamaTokenizer
    if how == "direct":
        return LlamaTokenizer(vocab_file=str(model_path), legacy=legacy)
    d = Path(tempfile.mkdtemp(prefix="tinyvicuna_"))
    (d / "tokenizer.model").write_bytes(model_path.read_bytes())

    def at(c):
        return {"__type": "AddedToken", "content": c, "lstrip": False, "normalized": False,
                "rstrip": False, "single_word": False}

    cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": at("<s>"),
           "clean_up_tokenization_spaces": False, "eos_token": at("</s>"), "legacy": legacy,
           "model_max_length": 4096, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
           "tokenizer_class": "LlamaTokenizer", "unk_token": at("<unk>")}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    stm = {k: {kk: vv for kk, vv in at(c).items() if kk != "__type"}
           for k, c in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
    (d / "special_tokens_map.json").write_text(json.dumps(stm, indent=2))
    return AutoTokenizer.from_pretrained(str(d), use_fast=False)


def compute(model_path: Path) -> dict:
    import sentencepiece as spm
    import transformers

    modes = {"legacy_false": False, "legacy_true": True}
    toks = {m: make_tokenizer(model_path, lg, "vicuna_dir") for m, lg in modes.items()}
    direct = {m: make_tokenizer(model_path, lg, "direct") for m, lg in modes.items()}
    for m, t in toks.items():
        assert type(t).__name__ == "LlamaTokenizer", type(t)
        assert t.legacy == modes[m]

    res = {"transformers_version": transformers.__version__,
           "sentencepiece_version": spm.__version__}

    # direct LlamaTokenizer(vocab_file, legacy) vs Vicuna-style directory: must agree
    mismatch = []

    def chk(name, a, b):
        if a != b:
            mismatch.append({"case": name, "vicuna_dir": a, "direct": b})

    image_cases = []
    for c in image_prompt_cases():
        c = dict(c)
        for m, t in toks.items():
            c[m] = tokenizer_image_token(c["prompt"], t)
            chunks = c["prompt"].split("<image>")
            c[m + "_chunk_tokens"] = [t.tokenize(ch) for ch in chunks]
            chk(f"{c['name']}/{m}", c[m], tokenizer_image_token(c["prompt"], direct[m]))
        image_cases.append(c)
    res["image_prompts"] = image_cases

    enc_cases = []
    for text in ENCODE_TEXTS:
        c = {"text": text}
        for m, t in toks.items():
            c[m] = t(text).input_ids
            c[m + "_tokens"] = t.tokenize(text)
            c[m + "_no_special"] = t(text, add_special_tokens=False).input_ids
            chk(f"encode {text!r}/{m}", c[m], direct[m](text).input_ids)
        enc_cases.append(c)
    res["encode"] = enc_cases

    t0 = toks["legacy_false"]
    res["piece_ids"] = {p: t0.convert_tokens_to_ids(p) for p in ENCODE_EXTRA_TOKENS
                        if p in t0.get_vocab()}

    dec_cases = []
    id_lists = decode_id_lists(toks["legacy_true"])
    for ids in id_lists:
        c = {"ids": ids, "pieces": toks["legacy_true"].convert_ids_to_tokens(ids)}
        for m, t in toks.items():
            c[m] = t.decode(ids, skip_special_tokens=True)
            c[m + "_keep_special"] = t.decode(ids, skip_special_tokens=False)
            chk(f"decode {ids}/{m}", c[m], direct[m].decode(ids, skip_special_tokens=True))
        dec_cases.append(c)
    res["decode"] = dec_cases
    res["batch_decode_skip_special"] = {
        m: t.batch_decode([d["ids"] for d in dec_cases[:4]], skip_special_tokens=True) for m, t in toks.items()}
    res["direct_vs_vicuna_dir_mismatches"] = mismatch
    return res


def sp_level(model_path: Path) -> dict:
    """Raw sentencepiece goldens (independent of transformers)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    out = {"vocab_size": sp.get_piece_size(), "unk_id": sp.unk_id(), "bos_id": sp.bos_id(),
           "eos_id": sp.eos_id(), "pad_id": sp.pad_id()}
    texts = ENCODE_TEXTS + [v1_prompt(QUERY).replace("<image>", "")] + \
        [QUERY_IND.format(indication=i) for i in INDICATIONS]
    out["encode_with_dummy_prefix"] = [{"text": t, "ids": sp.encode(t), "pieces": sp.encode(t, out_type=str)}
                                       for t in texts]
    from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf
    m = pb.ModelProto()
    m.ParseFromString(model_path.read_bytes())
    m.normalizer_spec.add_dummy_prefix = False
    sp2 = spm.SentencePieceProcessor()
    sp2.LoadFromSerializedProto(m.SerializeToString())
    out["encode_no_dummy_prefix"] = [{"text": t, "ids": sp2.encode(t)} for t in texts]
    out["decode"] = [{"ids": ids, "text": sp.decode(ids)} for ids in
                     ([5, 6, 7], [sp.piece_to_id("<0xC3>"), sp.piece_to_id("<0xA9>")], [sp.piece_to_id("▁")],
                      sp.encode("Dyspnée — émphysème?"), sp.encode(" The lungs"))]
    return out


def spec_summary(model_path: Path) -> dict:
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    m.ParseFromString(model_path.read_bytes())
    ts, ns = m.trainer_spec, m.normalizer_spec
    keys_t = ["model_type", "vocab_size", "character_coverage", "byte_fallback", "split_digits",
              "split_by_unicode_script", "split_by_whitespace", "split_by_number", "allow_whitespace_only_pieces",
              "treat_whitespace_as_suffix", "max_sentencepiece_length", "unk_id", "bos_id", "eos_id", "pad_id",
              "unk_piece", "bos_piece", "eos_piece", "unk_surface"]
    keys_n = ["name", "add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces"]
    tsd = {k: getattr(ts, k) for k in keys_t}
    tsd["model_type"] = pb.TrainerSpec.ModelType.Name(ts.model_type)
    return {"trainer_spec": tsd, "normalizer_spec": {k: getattr(ns, k) for k in keys_n},
            "pieces_sample": [(p.piece, p.score, pb.ModelProto.SentencePiece.Type.Name(p.type))
                              for p in list(m.pieces)[:5] + list(m.pieces)[255:265]]}


def diff_results(a: dict, b: dict) -> list:
    diffs = []
    for sect in ("image_prompts", "encode", "decode"):
        for ca, cb in zip(a[sect], b[sect]):
            for k in ca:
                if k.startswith("legacy_") and ca[k] != cb.get(k):
                    key = ca.get("name") or repr(ca.get("text", ca.get("ids")))
                    diffs.append({"section": sect, "case": key, "field": k,
                                  a["transformers_version"]: ca[k], b["transformers_version"]: cb.get(k)})
    return diffs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--emit-only", action="store_true")
    ap.add_argument("--also-python", default=None)
    args = ap.parse_args()

    if args.emit_only:
        json.dump(compute(MODEL_PATH), sys.stdout)
        return

    if args.train or not MODEL_PATH.exists():
        train_model(MODEL_PATH)
        print(f"trained {MODEL_PATH} ({MODEL_PATH.stat().st_size} bytes)")

    res = compute(MODEL_PATH)
    golden = {
        "layout": {
            "image_prompts": "tokenizer_image_token(prompt, tok) ids (IMAGE_TOKEN_INDEX=-200) per legacy mode; "
                             "*_chunk_tokens = tok.tokenize() of each '<image>'-split chunk",
            "encode": "tok(text).input_ids (BOS added), *_tokens = tok.tokenize(text), "
                      "*_no_special = tok(text, add_special_tokens=False).input_ids",
            "decode": "tok.decode(ids, skip_special_tokens=True); *_keep_special = skip_special_tokens=False",
            "sentencepiece": "raw sentencepiece (no transformers) encodes, with the model's add_dummy_prefix "
                             "(True) and with it switched off",
            "modes": "legacy_false = Vicuna-7b-v1.5 setting (tokenizer_config.json has \"legacy\": false); "
                     "legacy_true = transformers' legacy behaviour",
        },
        "model_file": MODEL_PATH.name,
        "model_sha256": hashlib.sha256(MODEL_PATH.read_bytes()).hexdigest(),
        "tokenizer_load": "AutoTokenizer.from_pretrained(dir, use_fast=False) on a dir with tokenizer.model + a "
                          "tokenizer_config.json mirroring lmsys/vicuna-7b-v1.5's (add_bos_token true, "
                          "add_eos_token false, clean_up_tokenization_spaces false, special tokens "
                          "normalized false, legacy false|true) - the way LLaVA-Rad loads Vicuna. A bare "
                          "LlamaTokenizer(vocab_file, legacy=...) agrees on everything except, under 4.31.0, text "
                          "containing literal '<s>', '</s>', '<unk>' (not registered as no-split tokens there); "
                          "see direct_vs_vicuna_dir_mismatches",
        "vicuna_7b_v1_5_legacy": False,
        "image_token_index": IMAGE_TOKEN_INDEX,
        "system": SYSTEM,
        "query": QUERY,
        "query_indication_template": QUERY_IND,
        "trainer_kwargs": TRAINER_KWARGS,
        "model_spec": spec_summary(MODEL_PATH),
        **res,
        "sentencepiece": sp_level(MODEL_PATH),
    }
    golden["primary_mode_differences"] = [
        {"section": s, "case": c.get("name") or c.get("text", c.get("ids")),
         "legacy_false": c["legacy_false"], "legacy_true": c["legacy_true"]}
        for s in ("image_prompts", "encode", "decode") for c in res[s] if c["legacy_false"] != c["legacy_true"]]

    if args.also_python:
        out = subprocess.run([args.also_python, __file__, "--emit-only"], check=True, capture_output=True,
                             text=True, env={**os.environ, "GOLDEN_OUT": str(OUT)}).stdout
        other = json.loads(out)
        golden["cross_check"] = {"transformers_version": other["transformers_version"],
                                 "differences": diff_results(res, other)}

    JSON_PATH.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {JSON_PATH} ({JSON_PATH.stat().st_size} bytes), transformers {res['transformers_version']}")
    print(f"  legacy true/false differences: {len(golden['primary_mode_differences'])}")
    if "cross_check" in golden:
        print(f"  cross-check vs {golden['cross_check']['transformers_version']}: "
              f"{len(golden['cross_check']['differences'])} differences")
    print(f"  direct vs vicuna-dir mismatches: {len(res['direct_vs_vicuna_dir_mismatches'])}")


if __name__ == "__main__":
    main()
