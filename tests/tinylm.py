"""A tiny random BERT model folder and a tiny labelled text corpus, written by the tests (no download)."""
from pathlib import Path

WORDS = {
    "sport": "ball goal team match score coach league win player cup".split(),
    "tech": "chip code data phone robot cloud app laptop server web".split(),
    "food": "bread soup cheese apple rice salad cake tea spice fish".split(),
}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_model(folder: Path, max_positions: int = 64, tokenizer: bool = True, dropout: float = 0.1) -> Path:
    """A 2-layer, hidden-32 BERT encoder (the head is added by AutoModelForSequenceClassification) + its tokenizer."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + sorted({w for ws in WORDS.values() for w in ws} | {"the", "a", "and", "of"})
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=max_positions,
                                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(123)
    transformers.BertModel(cfg).save_pretrained(folder)
    if tokenizer:
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tok = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=max_positions)
        tok.save_pretrained(folder)
    return folder


def sentence(cls: str, i: int, length: int = 6) -> str:
    ws = WORDS[cls]
    return " ".join(["the"] + [ws[(i * 3 + k * 7) % len(ws)] for k in range(length)])


def make_corpus(root: Path, per_class: int = 8, long_every: int = 0) -> Path:
    """``root/<class>/NNN.txt``: ``per_class`` short documents per class (every ``long_every``-th one long)."""
    for cls in WORDS:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            length = 80 if long_every and i % long_every == 0 else 4 + i % 5
            (root / cls / f"{i:03d}.txt").write_text(sentence(cls, i, length) + "\n")
    return root
