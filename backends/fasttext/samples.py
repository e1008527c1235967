"""A small supervised fastText model trained in about a second on synthetic text."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from compressor.plugin import SampleModel
from compressor_fasttext.data import LABEL_PREFIX

TOPICS = ("games", "sound", "science", "network", "graphics", "database")
#: Share of a line's topic words borrowed from another topic, so the task is not trivial.
NOISE = 0.3
#: fastText initialises the input matrix in ten blocks, one per thread; with fewer than
#: 11 threads part of it keeps whatever memory held (small models then fail with
#: "Encountered NaN"). Extra threads cost nothing on a model this size.
TRAIN_THREADS = 12


def write_labelled_text(
    path: Path,
    lines: int,
    seed: int,
    topics: Sequence[str] = TOPICS,
    vocabulary: int = 30,
    shared_vocabulary: int = 150,
) -> None:
    """Write ``lines`` lines of ``__label__topic words...``: each topic has ``vocabulary``
    words of its own, and every line mixes in words all topics share."""
    rng = random.Random(seed)
    topic_words = {topic: [f"{topic[:4]}{i}" for i in range(vocabulary)] for topic in topics}
    shared = [f"w{i}" for i in range(shared_vocabulary)]
    rows = []
    for _ in range(lines):
        topic = rng.choice(topics)
        words = [
            rng.choice(topic_words[rng.choice(topics) if rng.random() < NOISE else topic])
            for _ in range(rng.randint(3, 7))
        ]
        words += rng.choices(shared, k=rng.randint(3, 7))
        rng.shuffle(words)
        rows.append(f"{LABEL_PREFIX}{topic} {' '.join(words)}")
    path.write_text("\n".join(rows) + "\n")


def train_supervised(train: Path, destination: Path, bucket: int = 4000, dim: int = 16) -> Path:
    """Train and save a small classifier (word bigrams hashed into ``bucket`` rows)."""
    from compressor_fasttext.loading import fasttext_module

    fasttext = fasttext_module()

    model = fasttext.train_supervised(
        str(train), dim=dim, epoch=10, lr=0.5, wordNgrams=2, bucket=bucket,
        thread=TRAIN_THREADS, seed=0, verbose=0, minCount=1,
    )
    model.save_model(str(destination))
    return destination


def sample_models(directory: Path) -> list[SampleModel]:
    train, evaluation = directory / "train.txt", directory / "test.txt"
    write_labelled_text(train, 3000, seed=1)
    write_labelled_text(evaluation, 500, seed=2)
    model = train_supervised(train, directory / "topics.bin")
    return [
        SampleModel(
            backend="fasttext",
            name="topics",
            path=model,
            variants=(("pq cutoff=1000 retrain=true qnorm=true",),),
            eval_data=evaluation,
            train_data=train,
            description="6-topic text classifier (fastText, 4k hashed bigram rows, dim 16)",
        )
    ]
