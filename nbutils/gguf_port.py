"""Port Gemma 3 between a GGUF file (llama.cpp layout) and keras-hub's Gemma3 classes, both ways.

Facts this module relies on (each checked by tests/test_models.py):
- architecture metadata lives under ``gemma3.*``;
- llama.cpp stores every RMSNorm scale as ``1 + w``; keras-hub multiplies by ``(1 + scale)``,
  so we subtract 1;
- tensors dequantize to Hugging Face layout (``(out, in)`` matrices), which we reshape into
  keras-hub's einsum kernels;
- the tokenizer is a SentencePiece BPE model rebuilt from ``tokenizer.ggml.*``; the GGUF writes
  the whitespace-run pieces with plain spaces, which we restore to U+2581 (measured: mean token
  loss on Python source drops from 4.10 to 2.45 nats with the restored pieces).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from nbutils import files

# SentencePiece piece types share their numbering with GGUF's token_type field.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")
SPACE = "\u2581"  # SentencePiece's visible space
# (blocks, width) of the Gemma 3 sizes whose port is verified against known outputs. Larger ones
# (4B/12B/27B) use rope scaling and, for 27B, another query scaling, which this port does not map.
VERIFIED_SIZES = {(18, 640): "Gemma 3 270M", (2, 64): "the tiny test model"}


class GGUFError(ValueError):
    """A GGUF file that cannot be read or is not a Gemma 3 model."""


def read_gguf(path: Path):
    """Open a GGUF file, turning parser crashes into one clear error."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the parser raises many kinds on truncated/garbled files
        raise GGUFError(
            f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc}). "
            "It is probably truncated or altered: delete it and assemble/download it again."
        ) from None
    arch = _field(reader, "general.architecture", path)
    if arch != "gemma3":
        raise GGUFError(
            f"{path}: architecture is {arch!r}, expected 'gemma3' (a Gemma 3 text model)."
        )
    return reader


def _field(reader, key: str, path: Path | None = None):
    """One metadata value, or a GGUFError naming the missing key."""
    if key not in reader.fields:
        raise GGUFError(
            f"{path or 'GGUF file'}: metadata key {key!r} is missing; the file is not a complete Gemma 3 GGUF."
        )
    return reader.fields[key].contents()


def backbone_config(reader) -> dict:
    """Gemma3Backbone keyword arguments read from the ``gemma3.*`` metadata."""
    g = lambda k: _field(reader, f"gemma3.{k}")
    size = (int(g("block_count")), int(g("embedding_length")))
    if size not in VERIFIED_SIZES or "gemma3.rope.scaling.factor" in reader.fields:
        verified = ", ".join(
            f"{name} ({b} blocks x {w})" for (b, w), name in VERIFIED_SIZES.items()
        )
        raise GGUFError(
            f"a Gemma 3 GGUF with {size[0]} blocks x {size[1]} is not supported by this port (verified: "
            f"{verified}); load larger Gemma 3 models as a keras-hub preset, e.g. MODEL='gemma3_1b'."
        )
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return dict(
        vocabulary_size=vocab,
        image_size=None,
        num_layers=int(g("block_count")),
        num_query_heads=int(g("attention.head_count")),
        num_key_value_heads=int(g("attention.head_count_kv")),
        hidden_dim=int(g("embedding_length")),
        intermediate_dim=int(g("feed_forward_length")),
        head_dim=int(g("attention.key_length")),
        query_head_dim_normalize=True,
        use_query_key_norm=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        use_sliding_window_attention=True,
        sliding_window_size=int(g("attention.sliding_window")),
        # stored as float32
        layer_norm_epsilon=float(f"{g('attention.layer_norm_rms_epsilon'):.6g}"),
    )


# the tiny model's vocabulary keeps these beyond its first pieces (see truncated_proto)
KEEP_PIECES = (SPACE, "<start_of_image>", "<end_of_image>", "<img>")


def sentencepiece_proto(reader) -> bytes:
    """Serialized SentencePiece BPE model built from the GGUF vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    unk_id = int(_field(reader, "tokenizer.ggml.unknown_token_id"))
    # GGUF marks <unk> CONTROL; SentencePiece requires exactly one UNKNOWN piece
    types[unk_id] = UNKNOWN
    for i, piece in enumerate(tokens):
        if piece in TURN_TOKENS:
            # so "<start_of_turn>" in text is matched as one id, as Gemma's tokenizer does
            types[i] = USER_DEFINED

    proto = sp_pb2.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        # GGUF spells the 30 whitespace-run pieces (ids 138-167) with real spaces; SentencePiece
        # matches pieces after escaping spaces to U+2581, so they must use it too.
        proto.pieces.add(piece=piece.replace(" ", SPACE), score=float(score), type=int(kind))
    spec = proto.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    spec.unk_id = unk_id
    spec.bos_id = int(_field(reader, "tokenizer.ggml.bos_token_id"))
    spec.eos_id = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    spec.pad_id = int(_field(reader, "tokenizer.ggml.padding_token_id"))
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = False
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def truncated_proto(proto: bytes, size: int, keep: tuple[str, ...] = KEEP_PIECES) -> bytes:
    """The SentencePiece model ``proto`` cut to ``size`` pieces: its first ones and the pieces
    ``keep`` (the word boundary ``▁``, which byte-encoded would decode as a character rather than a
    space, and the image tokens keras-hub's Gemma 3 tokenizer requires). The BPE vocabulary stays
    usable: merges whose parts are gone never fire, byte fallback covers the rest."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    model = sp_pb2.ModelProto()
    model.ParseFromString(proto)
    names = [p.piece for p in model.pieces]
    if not len(keep) < size <= len(names) or not set(keep) <= set(names):
        raise ValueError(f"cannot keep {keep} in {size} of the {len(names)} pieces")
    cut = size  # the longest prefix that, with the keep pieces it lacks, makes ``size`` pieces
    while cut + len(set(keep) - set(names[:cut])) > size:
        cut -= 1
    kept = [model.pieces[names.index(k)] for k in keep if k not in names[:cut]]
    kept = [
        sp_pb2.ModelProto.SentencePiece(piece=p.piece, score=p.score, type=p.type) for p in kept
    ]
    del model.pieces[cut:]
    model.pieces.extend(kept)
    model.trainer_spec.vocab_size = size
    return model.SerializeToString()


def renamed_pieces(proto: bytes, names: dict[str, str]) -> bytes:
    """The SentencePiece model ``proto`` with pieces renamed (``old: new``), each made a
    user-defined piece so that its text tokenizes as one id."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    model = sp_pb2.ModelProto()
    model.ParseFromString(proto)
    for piece in model.pieces:
        if piece.piece in names:
            piece.piece, piece.type = names[piece.piece], USER_DEFINED
    missing = set(names.values()) - {p.piece for p in model.pieces}
    if missing:
        raise ValueError(
            f"renamed_pieces: {sorted(missing)} not made; the proto lacks their sources"
        )
    return model.SerializeToString()


def _tensor(reader, name: str) -> np.ndarray:
    """Dequantized float32 tensor in Hugging Face (row-major, out x in) layout."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        if t.name == name:
            return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    raise GGUFError(f"GGUF tensor {name!r} is missing; the file is not a complete Gemma 3 model.")


def _norm(reader, name: str) -> np.ndarray:
    """An RMSNorm scale, undoing llama.cpp's stored ``1 + w``."""
    return _tensor(reader, name) - 1.0


def _qkv(w: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """HF ``(heads*head_dim, hidden)`` to keras ``(heads, hidden, head_dim)``."""
    return w.reshape(heads, head_dim, -1).transpose(0, 2, 1)


def _attn_out(w: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """HF ``(hidden, heads*head_dim)`` to keras ``(heads, head_dim, hidden)``."""
    return w.reshape(-1, heads, head_dim).transpose(1, 2, 0)


def load_weights(backbone, reader) -> None:
    """Assign every backbone variable from the GGUF tensors (shapes are checked by Keras)."""
    heads, kv_heads, head_dim = (
        backbone.num_query_heads,
        backbone.num_key_value_heads,
        backbone.head_dim,
    )
    backbone.get_layer("token_embedding").embeddings.assign(_tensor(reader, "token_embd.weight"))
    backbone.get_layer("final_normalization").scale.assign(_norm(reader, "output_norm.weight"))
    for i in range(backbone.num_layers):
        block, p = backbone.get_layer(f"decoder_block_{i}"), f"blk.{i}."
        att = block.attention
        block.pre_attention_norm.scale.assign(_norm(reader, p + "attn_norm.weight"))
        block.post_attention_norm.scale.assign(_norm(reader, p + "post_attention_norm.weight"))
        block.pre_ffw_norm.scale.assign(_norm(reader, p + "ffn_norm.weight"))
        block.post_ffw_norm.scale.assign(_norm(reader, p + "post_ffw_norm.weight"))
        att.query_norm.scale.assign(_norm(reader, p + "attn_q_norm.weight"))
        att.key_norm.scale.assign(_norm(reader, p + "attn_k_norm.weight"))
        att.query_dense.kernel.assign(_qkv(_tensor(reader, p + "attn_q.weight"), heads, head_dim))
        att.key_dense.kernel.assign(_qkv(_tensor(reader, p + "attn_k.weight"), kv_heads, head_dim))
        att.value_dense.kernel.assign(
            _qkv(_tensor(reader, p + "attn_v.weight"), kv_heads, head_dim)
        )
        att.output_dense.kernel.assign(
            _attn_out(_tensor(reader, p + "attn_output.weight"), heads, head_dim)
        )
        block.gating_ffw.kernel.assign(_tensor(reader, p + "ffn_gate.weight").T)
        block.gating_ffw_2.kernel.assign(_tensor(reader, p + "ffn_up.weight").T)
        block.ffw_linear.kernel.assign(_tensor(reader, p + "ffn_down.weight").T)


def _qkv_to_hf(kernel: np.ndarray) -> np.ndarray:
    """keras ``(heads, hidden, head_dim)`` to HF ``(heads*head_dim, hidden)`` (inverse of
    :func:`_qkv`)."""
    return kernel.transpose(0, 2, 1).reshape(-1, kernel.shape[1])


def _attn_out_to_hf(kernel: np.ndarray) -> np.ndarray:
    """keras ``(heads, head_dim, hidden)`` to HF ``(hidden, heads*head_dim)`` (inverse of
    :func:`_attn_out`)."""
    return kernel.transpose(2, 0, 1).reshape(kernel.shape[2], -1)


def gguf_tensors(backbone) -> dict[str, np.ndarray]:
    """Every backbone weight under its llama.cpp name, in llama.cpp's layout (the inverse of
    :func:`load_weights`).

    Read through each layer's public ``kernel``, which for a LoRA-enabled layer is the merged
    kernel.
    """

    value = lambda v: np.asarray(keras.ops.convert_to_numpy(v), dtype=np.float32)
    out = {
        "token_embd.weight": value(backbone.get_layer("token_embedding").embeddings),
        "output_norm.weight": value(backbone.get_layer("final_normalization").scale) + 1.0,
    }
    for i in range(backbone.num_layers):
        block, p = backbone.get_layer(f"decoder_block_{i}"), f"blk.{i}."
        att = block.attention
        norms = {
            "attn_norm": block.pre_attention_norm,
            "post_attention_norm": block.post_attention_norm,
            "ffn_norm": block.pre_ffw_norm,
            "post_ffw_norm": block.post_ffw_norm,
            "attn_q_norm": att.query_norm,
            "attn_k_norm": att.key_norm,
        }
        out.update({f"{p}{name}.weight": value(layer.scale) + 1.0 for name, layer in norms.items()})
        out[p + "attn_q.weight"] = _qkv_to_hf(value(att.query_dense.kernel))
        out[p + "attn_k.weight"] = _qkv_to_hf(value(att.key_dense.kernel))
        out[p + "attn_v.weight"] = _qkv_to_hf(value(att.value_dense.kernel))
        out[p + "attn_output.weight"] = _attn_out_to_hf(value(att.output_dense.kernel))
        out[p + "ffn_gate.weight"] = value(block.gating_ffw.kernel).T
        out[p + "ffn_up.weight"] = value(block.gating_ffw_2.kernel).T
        out[p + "ffn_down.weight"] = value(block.ffw_linear.kernel).T
    return out


def vocabulary_fields(proto: bytes) -> tuple[list[str], list[float], list[int]]:
    """GGUF tokens, scores and token types from a SentencePiece proto: the inverse of
    :func:`sentencepiece_proto` (whitespace-run pieces spelled with spaces again; ``<unk>`` and the
    turn tokens typed CONTROL, as llama.cpp writes them)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto_model = sp_pb2.ModelProto.FromString(proto)
    tokens, scores, types = [], [], []
    for p in proto_model.pieces:
        whitespace_run = len(p.piece) > 1 and set(p.piece) == {SPACE}
        tokens.append(p.piece.replace(SPACE, " ") if whitespace_run else p.piece)
        scores.append(p.score)
        types.append(CONTROL if p.type == UNKNOWN or p.piece in TURN_TOKENS else p.type)
    return tokens, scores, types


def exportable(backbone) -> bool:
    """Whether this port can write (and read back) ``backbone``: a Gemma 3 of a verified size."""
    verified = (backbone.num_layers, backbone.hidden_dim) in VERIFIED_SIZES
    return type(backbone).__name__ == "Gemma3Backbone" and verified


def not_exportable_reason(backbone) -> str:
    """One line saying why a backbone's size is not exported to GGUF, and what to use."""
    if type(backbone).__name__ != "Gemma3Backbone":
        return (
            f"the GGUF port covers Gemma 3 only, not {type(backbone).__name__}; use the keras or "
            "transformers export."
        )
    return (
        f"the GGUF port covers the sizes it verifies ({', '.join(VERIFIED_SIZES.values())}), not "
        f"{backbone.num_layers} blocks x {backbone.hidden_dim}; use the keras or transformers export."
    )


def write_gguf(lm, path: Path, name: str = "Gemma 3 LoRA-tuned") -> Path:
    """Write ``lm`` (a keras-hub Gemma3CausalLM; LoRA layers are merged) as an f32 GGUF with
    llama.cpp's Gemma 3 metadata and SentencePiece vocabulary, atomically."""
    import gguf

    b, tokenizer = lm.backbone, lm.preprocessor.tokenizer
    if not exportable(b):
        raise GGUFError(not_exportable_reason(b))
    tokens, scores, types = vocabulary_fields(tokenizer.proto)
    with files.atomic_path(Path(path)) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="gemma3")
        w.add_name(name)
        w.add_context_length(32768)
        w.add_embedding_length(b.hidden_dim)
        w.add_block_count(b.num_layers)
        w.add_feed_forward_length(b.intermediate_dim)
        w.add_head_count(b.num_query_heads)
        w.add_head_count_kv(b.num_key_value_heads)
        w.add_key_length(b.head_dim)
        w.add_value_length(b.head_dim)
        w.add_layer_norm_rms_eps(b.layer_norm_epsilon)
        w.add_rope_freq_base(1_000_000.0)
        w.add_sliding_window(b.sliding_window_size)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        for add, token in (
            (w.add_bos_token_id, "<bos>"),
            (w.add_eos_token_id, "<eos>"),
            (w.add_unk_token_id, "<unk>"),
            (w.add_pad_token_id, "<pad>"),
        ):
            add(int(tokenizer.token_to_id(token)))
        w.add_add_bos_token(True)
        w.add_add_sep_token(False)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(False)
        for tensor_name, array in gguf_tensors(b).items():
            w.add_tensor(tensor_name, array)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(path)
