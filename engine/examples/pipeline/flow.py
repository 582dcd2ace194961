"""The three stages. Each returns its hand-off instead of enqueueing it: the worker's ack of the
job inserts the next stage's jobs in the same statement (engine/stages.py), so a worker killed
between the two can neither lose the next stage nor run it twice.

Documents are generated text (sample_documents); embeddings are a deterministic stand-in for an
embedding API (a hash of the chunk's words), written to the `pipeline_embeddings` table.
"""

from __future__ import annotations

import hashlib
import logging
import random
from typing import Any, Final

from engine import Next, Result
from engine.errors import PermanentError

log = logging.getLogger("skiplock.examples.pipeline")

CHUNK_WORDS: Final = 40
DIMENSIONS: Final = 8
WORDS: Final = ("queue", "worker", "batch", "ledger", "invoice", "shipment", "ticket", "survey", "policy",
                "record", "stage", "report", "signal", "budget", "vendor", "customer", "window", "table")


class EmptyDocument(PermanentError):
    """A document with no text: nothing to chunk (its job is a dead letter at once)."""


def sample_documents(count: int, seed: int = 4) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    docs = []
    for n in range(count):
        paragraphs = ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
                                for _ in range(1)) for _ in range(rng.randint(1, 5))]
        docs.append({"document": f"doc-{n:05d}", "text": "\n\n".join(paragraphs)})
    return docs


def parse(payload: dict[str, Any]) -> Any:
    """uploaded -> parse_complete: validate and normalise the text, hand it to `chunk`."""
    text = str(payload.get("text", "")).strip()
    if not text:
        raise EmptyDocument(f"document {payload.get('document')!r} has no text")
    paragraphs = [p.split() for p in text.split("\n\n") if p.strip()]
    return Result({"paragraphs": len(paragraphs)},
                  Next("chunk", {"document": payload["document"], "paragraphs": [" ".join(p) for p in paragraphs]}))


def chunk(payload: dict[str, Any]) -> Any:
    """parse_validated -> chunks_stored: one `embed` job per chunk, with deterministic chunk ids (a
    retried parent produces the same ids; the dedupe key keeps a chunk from being queued twice)."""
    words = " ".join(payload["paragraphs"]).split()
    chunks = [" ".join(words[i:i + CHUNK_WORDS]) for i in range(0, len(words), CHUNK_WORDS)]
    out = []
    for index, text in enumerate(chunks):
        chunk_id = hashlib.sha1(f"{payload['document']}:{index}".encode()).hexdigest()[:16]
        out.append(Next("embed", {"document": payload["document"], "chunk": chunk_id, "index": index,
                                  "text": text}, dedupe_key=chunk_id))
    return out


def embed(payload: dict[str, Any], ctx: Any) -> Any:
    """embedding_queued -> embeddings_stored: the vector is written through ctx.pg, in the ack's
    transaction (transactional = true), so a stored embedding and its completed job go together."""
    digest = hashlib.sha256(payload["text"].encode()).digest()
    vector = [round(b / 255.0, 3) for b in digest[:DIMENSIONS]]
    ctx.pg.execute(
        "INSERT INTO pipeline_embeddings (chunk, document, position, vector) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (chunk) DO UPDATE SET vector = EXCLUDED.vector",
        (payload["chunk"], payload["document"], payload["index"], vector))
    return {"dimensions": DIMENSIONS}


def create_embeddings_table(conn: Any) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS pipeline_embeddings (chunk text PRIMARY KEY, document text NOT NULL, "
                 "position integer NOT NULL, vector real[] NOT NULL, stored_at timestamptz NOT NULL DEFAULT now())")


def document_set_complete(run_id: str, summary: dict[str, Any]) -> None:
    """embeddings_stored -> complete: the run (every document, chunk and embedding) has ended."""
    log.info("document set complete", extra={"run": run_id, **summary})
