# Build a small random-init Llama + a 32000-token WordLevel tokenizer (no hub access needed).
import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = sys.argv[1]
hidden = int(os.environ.get("HID", 512))
layers = int(os.environ.get("LAYERS", 8))
V = 32000
os.makedirs(out, exist_ok=True)
vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
for i in range(3, V):
    vocab[f"w{i}"] = i
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
)
fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
fast.save_pretrained(out)
cfg = LlamaConfig(
    vocab_size=V,
    hidden_size=hidden,
    intermediate_size=hidden * 3,
    num_hidden_layers=layers,
    num_attention_heads=hidden // 64,
    num_key_value_heads=hidden // 64,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
    torch_dtype="float16",
)
torch.manual_seed(0)
m = LlamaForCausalLM(cfg).to(torch.float16)
m.save_pretrained(out, safe_serialization=True)
print("saved", out, sum(p.numel() for p in m.parameters()) / 1e6, "M params")
