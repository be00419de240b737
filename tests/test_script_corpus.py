"""The training-script corpus: ordinary scripts, each run as a person runs it
(`python train.py ARGS` in a subprocess, from the directory it expects), exiting 0 and
learning. `autoopt optimize --script` end-to-end tests reuse the CORPUS table below.

CORPUS entries:
  name      a short id
  dir       the directory holding the script (and the modules it imports from there)
  script    the script's file name in dir
  args      its arguments; paths in them are relative to the working directory
  prepare   callable(work_dir) writing the data the script reads into work_dir, or None
  cwd       "work": run from the work directory prepare filled (the script by its absolute
            path, so sys.path[0] is still the script's directory)
  steps     optimizer steps the args make the script run (autoopt stops it earlier)
  loss_re   a regex whose group 1 is a training loss the script prints
  slow      True when a plain run takes more than ~5 s here (each takes 3-9 s on one thread)
  outside   True for a script copied verbatim from a published package (its folder holds the
            package's LICENSE and an ATTRIBUTION.md with the file's sha256); False for ours
  env       (optional) environment variables the run needs, "{work}" standing for the work
            directory, e.g. the Hugging Face offline switches; run_env(entry, work_dir) merges them

command(entry, work_dir) prepares the data and returns (argv, cwd) for the plain run:
argv[1] is the script, argv[2:] its arguments (`autoopt optimize --script argv[1] -- argv[2:]`
from cwd, in the environment run_env(entry, work_dir), is the same run under autoopt).

The scripts under tests/data/scripts/ are described in tests/data/scripts/README.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "data" / "scripts"
# torchvision, installed apart by scripts/test.sh (see tests/data/scripts/_torchvision_cpu)
TORCHVISION = ROOT / "tests" / ".deps" / "torchvision"

# ---------------------------------------------------------------------------- data generators

_NOUNS = ["cat", "dog", "bird", "fox", "horse", "mouse", "owl", "fish"]
_ADJECTIVES = ["small", "big", "red", "quick", "slow", "old", "young", "grey"]
_VERBS = ["sees", "chases", "likes", "follows", "hears", "finds"]


def _sentence(rng: random.Random) -> str:
    def phrase() -> str:
        return f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"

    return f"{phrase()} {rng.choice(_VERBS)} {phrase()}"


def _sentences(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [_sentence(rng) for _ in range(count)]


def prepare_chars(work_dir: Path) -> None:
    """data/chars/{train,val}.bin (uint16 character ids) and meta.pkl, as the memmap LM reads."""
    text = {"train": ". ".join(_sentences(0, 1500)) + ".", "val": ". ".join(_sentences(1, 200)) + "."}
    chars = sorted(set(text["train"]) | set(text["val"]))
    stoi = {c: i for i, c in enumerate(chars)}
    out = work_dir / "data" / "chars"
    out.mkdir(parents=True, exist_ok=True)
    for split, s in text.items():
        np.array([stoi[c] for c in s], dtype=np.uint16).tofile(out / f"{split}.bin")
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "stoi": stoi, "itos": dict(enumerate(chars))}, f)


def prepare_sophia(work_dir: Path) -> None:
    """The character data of prepare_chars, and the package's configurator.py in the working
    directory: sophia-opt's train_adam.py runs `exec(open('configurator.py').read())` from the
    directory it is started in (the repository's root, in its own README)."""
    prepare_chars(work_dir)
    shutil.copyfile(SCRIPTS / "sophia_gpt" / "configurator.py", work_dir / "configurator.py")


def prepare_digits(work_dir: Path) -> None:
    """digits.pt: 16x16 images in [-1, 1] of 10 classes (a fixed random stroke pattern each,
    shifted by up to a pixel, with noise), 800 for training and 200 for testing."""
    g = torch.Generator().manual_seed(0)
    prototypes = (torch.rand(10, 1, 16, 16, generator=g) > 0.7).float() * 2 - 1

    def split(n: int):
        labels = torch.randint(0, 10, (n,), generator=g)
        shifts = torch.randint(-1, 2, (n, 2), generator=g)
        images = torch.stack([torch.roll(prototypes[c], (int(dy), int(dx)), dims=(1, 2))
                              for c, (dy, dx) in zip(labels.tolist(), shifts.tolist())])
        images = (images + 0.5 * torch.randn(images.shape, generator=g)).clamp(-1, 1)
        return images, labels

    torch.save({"train": split(800), "test": split(200)}, work_dir / "digits.pt")


def prepare_mnist(work_dir: Path) -> None:
    """mnist/MNIST/raw/: the four uncompressed IDX files torchvision's `datasets.MNIST` reads
    (and, finding them, does not download), of generated 28x28 digits: 10 classes, a fixed
    random blob pattern each, shifted by up to two pixels, with noise; 2048 for training and
    512 for testing."""
    g = torch.Generator().manual_seed(0)
    prototypes = (torch.rand(10, 28, 28, generator=g) > 0.75).float() * 200

    def split(n: int) -> tuple[bytes, bytes]:
        labels = torch.randint(0, 10, (n,), generator=g)
        shifts = torch.randint(-2, 3, (n, 2), generator=g)
        images = torch.stack([torch.roll(prototypes[c], (int(dy), int(dx)), dims=(0, 1))
                              for c, (dy, dx) in zip(labels.tolist(), shifts.tolist())])
        images = (images + 40 * torch.randn(images.shape, generator=g)).clamp(0, 255).to(torch.uint8)
        # IDX: a big-endian magic (0, 0, 0x08 = unsigned byte, number of dimensions), the sizes
        # as big-endian int32, then the data
        head = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape)
        return head + images.numpy().tobytes(), bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(labels.tolist())

    raw = work_dir / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", 2048), ("t10k", 512)):
        images, labels = split(n)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(images)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)


def prepare_text(work_dir: Path) -> None:
    """corpus/{train,valid,test}.txt: one generated sentence a line."""
    out = work_dir / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    for seed, (split, count) in enumerate((("train", 2500), ("valid", 100), ("test", 100))):
        (out / f"{split}.txt").write_text("\n".join(_sentences(10 + seed, count)) + "\n")


_LANGUAGES = {  # syllables each generated "language" builds its names from
    "Italian": ["ro", "ma", "ni", "lli", "ga", "ri", "ta", "no", "ce"],
    "Japanese": ["ka", "shi", "ta", "mo", "yu", "ki", "hi", "ro", "na"],
    "Polish": ["szcz", "ski", "wa", "ow", "rz", "ek", "cz", "la", "ni"],
    "Scottish": ["mac", "gre", "or", "don", "ald", "son", "kin", "ie", "mur"],
}


def prepare_names(work_dir: Path) -> None:
    """names/<Language>.txt, one generated name a line (150 a language), the layout of the names
    data set opacus' char-LSTM classifier reads from --data-root."""
    rng = random.Random(0)
    out = work_dir / "names"
    out.mkdir(parents=True, exist_ok=True)
    for language, syllables in _LANGUAGES.items():
        names = ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))).capitalize() for _ in range(150)]
        (out / f"{language}.txt").write_text("\n".join(names) + "\n")


def prepare_sft(work_dir: Path) -> None:
    """tiny_lm/ (a 2-layer, 32-wide Llama causal LM at random init and a word-level tokenizer,
    saved with save_pretrained) and sft_data/train.jsonl (600 generated sentences as {"text"}),
    what trl's sft.py reads through --model_name_or_path and --dataset_name, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    lines = [s + " ." for s in _sentences(20, 600)]
    data = work_dir / "sft_data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in lines))
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + sorted({w for s in lines for w in s.split()}))}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tokenizer.save_pretrained(work_dir / "tiny_lm")
    model.save_pretrained(work_dir / "tiny_lm")


# what a Hugging Face script needs to run here: no network, caches inside the work directory
_HF_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HOME": "{work}/hf_home"}


# ---------------------------------------------------------------------------- the corpus

CORPUS = [
    {   # the bundled example: argparse, a CNN, a DataLoader, AdamW, loss.item() every N steps
        "name": "example_cnn", "dir": ROOT / "examples", "script": "train_script.py",
        "args": ["--epochs", "2", "--steps-per-epoch", "100", "--log-every", "10"],
        "prepare": None, "cwd": "work", "steps": 200, "loss_re": r"step \d+ loss (\d+\.\d+)", "slow": True,
        "outside": False,
    },
    {   # module-level script, --name=value overrides of its globals, model.py beside it, uint16
        # memmap token files under data/<dataset>/, gradient accumulation, a GradScaler (off in
        # float32), clipping, a per-iteration lr schedule, periodic eval, loss.item() logging
        "name": "lm_memmap", "dir": SCRIPTS / "lm_memmap", "script": "train.py",
        "args": ["--max_iters=150", "--eval_interval=100", "--eval_iters=2", "--log_interval=10",
                 "--batch_size=8", "--context=32", "--width=32", "--heads=2"],
        "prepare": prepare_chars, "cwd": "work", "steps": 151, "loss_re": r"iter \d+: loss (\d+\.\d+)",
        "slow": True, "outside": False,
    },
    {   # explicit nn.Parameter weights and F.conv2d, data from a torch.save'd file, hand-made
        # batches (randperm + indexing, no DataLoader), SGD + StepLR, .item() on every step
        "name": "cnn_tensorfile", "dir": SCRIPTS / "cnn_tensorfile", "script": "train.py",
        "args": ["--data", "digits.pt", "--epochs", "6", "--batch-size", "16"],
        "prepare": prepare_digits, "cwd": "work", "steps": 300, "loss_re": r"epoch \d+: loss (\d+\.\d+)",
        "slow": True, "outside": False,
    },
    {   # an LSTM language model: text files, truncated BPTT with the hidden state carried (and
        # detached) across steps, a model called with two inputs returning a tuple, clipping
        "name": "lstm_textfiles", "dir": SCRIPTS / "lstm_textfiles", "script": "train.py",
        "args": ["--data", "corpus", "--epochs", "2", "--batch_size", "16", "--bptt", "24",
                 "--lr", "0.005", "--log-interval", "10", "--save", "model.pt"],
        "prepare": prepare_text, "cwd": "work", "steps": 2 * 53, "loss_re": r"\| loss +(\d+\.\d+)",
        "slow": True, "outside": False,
    },
    {   # autoopt's own small script for `profile --script`: a CNN, a DataLoader, SGD, per-epoch print
        "name": "train_cnn", "dir": ROOT / "tests" / "scripts", "script": "train_cnn.py",
        "args": ["--epochs", "12", "--batch-size", "16"],
        "prepare": None, "cwd": "work", "steps": 12 * 16, "loss_re": r"epoch \d+ loss (\d+\.\d+)", "slow": True,
        "outside": False,
    },
    # ---- outside scripts, copied verbatim from published packages (see each ATTRIBUTION.md)
    {   # opacus 1.6.0 examples/char-lstm-classification.py: argparse, a custom Dataset over a
        # directory of text files, random_split (unseeded), DataLoader with a collate_fn and a
        # worker process, opacus' DPLSTM (an LSTM of nn.Linear cells), SGD, tqdm, float(loss) every
        # step and the epoch's mean loss printed; --disable-dp trains without the PrivacyEngine
        "name": "opacus_char_lstm", "dir": SCRIPTS / "opacus_char_lstm", "script": "char-lstm-classification.py",
        "args": ["--data-root", "names", "--device", "cpu", "--disable-dp", "-b", "32", "--epochs", "8",
                 "--embedding-size", "16", "--hidden-size", "32"],
        "prepare": prepare_names, "cwd": "work", "steps": 8 * 15,  # 480 training names, batches of 32
        "loss_re": r"Epoch \d+\. Accuracy: [\d.]+ \| Loss: (\d+\.\d+)", "slow": True, "outside": True,
    },
    {   # opacus 1.6.0 examples/mnist.py: argparse, torchvision's datasets.MNIST (download=True,
        # found on disk) with ToTensor/Normalize transforms, DataLoader with pin_memory, a small CNN
        # (two Conv2d, max_pool2d, view, two Linear), SGD, tqdm, loss.item() every step and the
        # epoch's mean loss printed, a test pass under no_grad, results torch.save'd to the cwd;
        # --disable-dp trains without the PrivacyEngine. torchvision imports through the
        # _torchvision_cpu shim (its sitecustomize.py says why)
        "name": "opacus_mnist", "dir": SCRIPTS / "opacus_mnist", "script": "mnist.py",
        "args": ["--data-root", "mnist", "--device", "cpu", "--disable-dp", "-b", "64", "--epochs", "10",
                 "--test-batch-size", "256"],
        "prepare": prepare_mnist, "cwd": "work", "steps": 10 * 32,  # 2048 training images, batches of 64
        "loss_re": r"Train Epoch: \d+ \t Loss: (\d+\.\d+)", "slow": True, "outside": True,
        "env": {"PYTHONPATH": os.pathsep.join([str(SCRIPTS / "_torchvision_cpu"), str(TORCHVISION)])},
    },
    {   # sophia-opt 0.2.2 examples/train_adam.py (a nanoGPT derivative): a module-level script whose
        # globals are overridden by --key=value through configurator.py exec'd from the cwd; model.py
        # and sophia.py beside it; uint16 memmap token files under data/<dataset>/; a GPT (causal
        # self-attention, tied output layer) returning (logits, loss), built by a config dataclass;
        # AdamW with decay / no-decay groups made by model.configure_optimizers; gradient
        # accumulation (x8 outside DDP, the next batch fetched between forward and backward); a
        # disabled torch.cuda.amp.GradScaler; clipping with .item() on the norm; the lr set by hand;
        # an eval and a checkpoint at step 0; loss.item(), parameter and optimizer-state norms
        # every log_interval
        "name": "sophia_gpt", "dir": SCRIPTS / "sophia_gpt", "script": "train_adam.py",
        "args": ["--device=cpu", "--compile=False", "--dtype=float32", "--dataset=chars", "--out_dir=out",
                 "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
                 "--gradient_accumulation_steps=1", "--max_iters=149", "--eval_interval=100000", "--eval_iters=2",
                 "--warmup_iters=10", "--lr_decay_iters=150", "--learning_rate=2e-3", "--log_interval=10",
                 "--always_save_checkpoint=False"],
        "prepare": prepare_sophia, "cwd": "work", "steps": 150, "loss_re": r"iter \d+: loss (\d+\.\d+)",
        "slow": True, "outside": True,
    },
    {   # trl 1.16.0 trl/scripts/sft.py (`trl sft`): a Hugging Face Trainer script (SFTTrainer over
        # TrainingArguments parsed by TrlParser), a causal LM loaded by path, a local json data set
        # through datasets.load_dataset; the Trainer's own loop, AdamW, linear lr decay, log dicts
        "name": "trl_sft", "dir": SCRIPTS / "trl_sft", "script": "sft.py",
        "args": ["--model_name_or_path", "tiny_lm", "--dataset_name", "sft_data", "--output_dir", "out",
                 "--max_steps", "200", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
                 "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none", "--max_length", "32",
                 "--bf16", "false"],
        "prepare": prepare_sft, "cwd": "work", "steps": 200, "loss_re": r"\{'loss': '(\d+(?:\.\d+)?)'",
        "slow": True, "outside": True, "env": _HF_OFFLINE,
    },
]


def command(entry: dict, work_dir: Path) -> tuple[list[str], Path]:
    """The argv and working directory that run `entry` as `python train.py ARGS` would,
    after its data was prepared in work_dir."""
    if entry["prepare"] is not None:
        entry["prepare"](work_dir)
    assert entry["cwd"] == "work", entry["cwd"]
    return [sys.executable, str(entry["dir"] / entry["script"]), *entry["args"]], work_dir


def run_env(entry: dict, work_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (os.environ by default) with the entry's own variables ("env") set, "{work}" in
    their values replaced by work_dir."""
    env = dict(os.environ if base is None else base)
    env.update({k: v.replace("{work}", str(work_dir)) for k, v in entry.get("env", {}).items()})
    return env


# Counts the optimizer steps of the process it is loaded into (through PYTHONPATH, as
# sitecustomize), writing the count at exit to $CORPUS_STEPS_FILE: the script itself, its
# argv, cwd, sys.path[0] and stdout are as in a plain run.
_STEP_COUNTER = """
import atexit, os
from torch.optim.optimizer import register_optimizer_step_post_hook

_steps = [0]
register_optimizer_step_post_hook(lambda opt, args, kwargs: _steps.__setitem__(0, _steps[0] + 1))
atexit.register(lambda: open(os.environ["CORPUS_STEPS_FILE"], "w").write(str(_steps[0])))

# then the next sitecustomize on the path (an entry's own, e.g. the torchvision shim), as if
# this one were not there
import importlib.machinery, importlib.util, sys
_here = os.path.dirname(os.path.abspath(__file__))
_next = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _next is not None:
    _module = importlib.util.module_from_spec(_next)
    _next.loader.exec_module(_module)
"""


def _run(entry: dict, work_dir: Path, count_steps: bool = False) -> subprocess.CompletedProcess:
    argv, cwd = command(entry, work_dir)
    # not the checkout's path (a user's run), only what the entry itself sets
    env = run_env(entry, work_dir, {k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    # one thread: on this shared 2-core machine, two OpenMP threads spin while the other is
    # descheduled and a 4 s run takes 30 s
    env["OMP_NUM_THREADS"] = "1"
    if count_steps:
        site = work_dir / "_step_counter"
        site.mkdir()
        (site / "sitecustomize.py").write_text(_STEP_COUNTER)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
        env["CORPUS_STEPS_FILE"] = str(site / "steps")
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _steps_run(work_dir: Path) -> int:
    return int((work_dir / "_step_counter" / "steps").read_text())


def _params():
    for entry in CORPUS:
        marks = [pytest.mark.slow] if entry["slow"] else []
        yield pytest.param(entry, id=entry["name"], marks=marks)


@pytest.mark.parametrize("entry", list(_params()))
def test_script_runs_plain_and_learns(entry, tmp_path):
    proc = _run(entry, tmp_path, count_steps=True)
    assert proc.returncode == 0, f"{entry['name']} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert _steps_run(tmp_path) == entry["steps"]
    losses = [float(m) for m in re.findall(entry["loss_re"], proc.stdout)]
    assert len(losses) >= 3, proc.stdout[-2000:]
    assert losses[-1] < 0.8 * losses[0], (entry["name"], losses)


def test_torchvision_for_the_corpus_is_installed_apart():
    """scripts/test.sh put torchvision into tests/.deps/torchvision, and not into the environment
    (where, beside a CPU torch, it would break `import transformers`)."""
    assert (TORCHVISION / "torchvision" / "__init__.py").is_file(), (
        f"{TORCHVISION} holds no torchvision: run scripts/test.sh (the README's test command), which installs "
        "it there for opacus' MNIST example")
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None and torch.version.cuda is None:
        pytest.fail("torchvision is installed in this environment beside a CPU build of torch, where its C++ ops "
                    "cannot load and `import transformers` fails: `pip uninstall torchvision`; the tests use "
                    f"the copy in {TORCHVISION}")


def test_corpus_scripts_are_ordinary_pytorch():
    """No corpus script knows about autoopt, and each directory says where its files came from."""
    for entry in CORPUS:
        path = entry["dir"] / entry["script"]
        source = path.read_text()
        assert re.search(r"^\s*(import|from)\s+autoopt", source, re.M) is None, path
    readme = (SCRIPTS / "README.md").read_text()
    for entry in CORPUS:
        if entry["dir"].parent == SCRIPTS:
            assert f"`{entry['dir'].name}/`" in readme, entry["name"]


def test_example_script_flags_bound_the_run(tmp_path):
    """--epochs x --steps-per-epoch optimizer steps, a loss line every --log-every steps."""
    entry = dict(CORPUS[0], args=["--epochs", "2", "--steps-per-epoch", "3", "--log-every", "2",
                                  "--batch-size", "8", "--lr", "0.01"])
    proc = _run(entry, tmp_path, count_steps=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps_run(tmp_path) == 6
    steps = [int(s) for s in re.findall(r"step (\d+) loss", proc.stdout)]
    assert steps == [2, 4, 6], proc.stdout
    assert len(re.findall(r"epoch \d+ done: train [\d.]+ s, val accuracy", proc.stdout)) == 2, proc.stdout


def test_outside_scripts_are_verbatim_with_their_licence():
    """Each outside script sits beside its package's LICENSE and an ATTRIBUTION.md whose recorded
    sha256 is the file's own: the copy is the published one, byte for byte."""
    outside = [entry for entry in CORPUS if entry["outside"]]
    assert len(outside) >= 4
    for entry in outside:
        folder = entry["dir"]
        licence = (folder / "LICENSE").read_text()
        assert "Apache License" in licence or licence.startswith("MIT License"), folder
        attribution = (folder / "ATTRIBUTION.md").read_text()
        recorded = re.search(r"sha256 of the file `([0-9a-f]{64})`", attribution)
        assert recorded is not None, folder
        digest = hashlib.sha256((folder / entry["script"]).read_bytes()).hexdigest()
        assert digest == recorded.group(1), f"{folder / entry['script']} differs from the published copy"
        # every other file beside it (modules it imports, the licence) is a recorded copy too
        for path in folder.iterdir():
            if path.name not in ("ATTRIBUTION.md", "__pycache__"):
                assert hashlib.sha256(path.read_bytes()).hexdigest() in attribution, path
