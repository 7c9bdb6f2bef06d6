from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Fingerprint(_message.Message):
    __slots__ = ("vocab_size", "tokenizer_hash", "id_space", "logit_width")
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_HASH_FIELD_NUMBER: _ClassVar[int]
    ID_SPACE_FIELD_NUMBER: _ClassVar[int]
    LOGIT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    vocab_size: int
    tokenizer_hash: str
    id_space: int
    logit_width: int
    def __init__(self, vocab_size: _Optional[int] = ..., tokenizer_hash: _Optional[str] = ..., id_space: _Optional[int] = ..., logit_width: _Optional[int] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ...) -> None: ...

class Codec(_message.Message):
    __slots__ = ("name", "k", "eps", "k_max", "bits")
    NAME_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    K_MAX_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    name: str
    k: int
    eps: float
    k_max: int
    bits: int
    def __init__(self, name: _Optional[str] = ..., k: _Optional[int] = ..., eps: _Optional[float] = ..., k_max: _Optional[int] = ..., bits: _Optional[int] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("fingerprint", "sampling", "prompt_ids", "seed", "codec", "report_target_prob", "protocol", "epoch", "conditioning_layer", "span_stop_ids", "span_stop_chars")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    REPORT_TARGET_PROB_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CONDITIONING_LAYER_FIELD_NUMBER: _ClassVar[int]
    SPAN_STOP_IDS_FIELD_NUMBER: _ClassVar[int]
    SPAN_STOP_CHARS_FIELD_NUMBER: _ClassVar[int]
    fingerprint: Fingerprint
    sampling: Sampling
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    codec: Codec
    report_target_prob: bool
    protocol: int
    epoch: int
    conditioning_layer: int
    span_stop_ids: _containers.RepeatedScalarFieldContainer[int]
    span_stop_chars: str
    def __init__(self, fingerprint: _Optional[_Union[Fingerprint, _Mapping]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., codec: _Optional[_Union[Codec, _Mapping]] = ..., report_target_prob: _Optional[bool] = ..., protocol: _Optional[int] = ..., epoch: _Optional[int] = ..., conditioning_layer: _Optional[int] = ..., span_stop_ids: _Optional[_Iterable[int]] = ..., span_stop_chars: _Optional[str] = ...) -> None: ...

class DraftedPosition(_message.Message):
    __slots__ = ("token_id", "distribution")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    distribution: bytes
    def __init__(self, token_id: _Optional[int] = ..., distribution: _Optional[bytes] = ...) -> None: ...

class SpanRequest(_message.Message):
    __slots__ = ("stop_ids", "max_tokens")
    STOP_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    stop_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    def __init__(self, stop_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class StepToJudge(_message.Message):
    __slots__ = ("step_ids", "score", "threshold", "regenerate")
    STEP_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REGENERATE_FIELD_NUMBER: _ClassVar[int]
    step_ids: _containers.RepeatedScalarFieldContainer[int]
    score: str
    threshold: float
    regenerate: SpanRequest
    def __init__(self, step_ids: _Optional[_Iterable[int]] = ..., score: _Optional[str] = ..., threshold: _Optional[float] = ..., regenerate: _Optional[_Union[SpanRequest, _Mapping]] = ...) -> None: ...

class Verify(_message.Message):
    __slots__ = ("seq", "pending_ids", "position", "epoch", "block", "span", "step")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PENDING_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    seq: int
    pending_ids: _containers.RepeatedScalarFieldContainer[int]
    position: int
    epoch: int
    block: _containers.RepeatedCompositeFieldContainer[DraftedPosition]
    span: SpanRequest
    step: StepToJudge
    def __init__(self, seq: _Optional[int] = ..., pending_ids: _Optional[_Iterable[int]] = ..., position: _Optional[int] = ..., epoch: _Optional[int] = ..., block: _Optional[_Iterable[_Union[DraftedPosition, _Mapping]]] = ..., span: _Optional[_Union[SpanRequest, _Mapping]] = ..., step: _Optional[_Union[StepToJudge, _Mapping]] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EdgeMessage(_message.Message):
    __slots__ = ("open", "verify", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: Open
    verify: Verify
    close: Close
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., verify: _Optional[_Union[Verify, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("session_id", "max_context", "max_message_bytes", "fingerprint", "conditioning", "conditioning_dim")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CONDITIONING_FIELD_NUMBER: _ClassVar[int]
    CONDITIONING_DIM_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_context: int
    max_message_bytes: int
    fingerprint: Fingerprint
    conditioning: bytes
    conditioning_dim: int
    def __init__(self, session_id: _Optional[str] = ..., max_context: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., fingerprint: _Optional[_Union[Fingerprint, _Mapping]] = ..., conditioning: _Optional[bytes] = ..., conditioning_dim: _Optional[int] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("seq", "accepted", "token_id", "target_probs", "server_seconds", "accepted_count", "stale", "epoch", "queue_seconds", "span_ids", "step_accepted", "step_score")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_PROBS_FIELD_NUMBER: _ClassVar[int]
    SERVER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SPAN_IDS_FIELD_NUMBER: _ClassVar[int]
    STEP_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    STEP_SCORE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    accepted: bool
    token_id: int
    target_probs: _containers.RepeatedScalarFieldContainer[float]
    server_seconds: float
    accepted_count: int
    stale: bool
    epoch: int
    queue_seconds: float
    span_ids: _containers.RepeatedScalarFieldContainer[int]
    step_accepted: bool
    step_score: float
    def __init__(self, seq: _Optional[int] = ..., accepted: _Optional[bool] = ..., token_id: _Optional[int] = ..., target_probs: _Optional[_Iterable[float]] = ..., server_seconds: _Optional[float] = ..., accepted_count: _Optional[int] = ..., stale: _Optional[bool] = ..., epoch: _Optional[int] = ..., queue_seconds: _Optional[float] = ..., span_ids: _Optional[_Iterable[int]] = ..., step_accepted: _Optional[bool] = ..., step_score: _Optional[float] = ...) -> None: ...

class CloudMessage(_message.Message):
    __slots__ = ("opened", "verdict")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    verdict: Verdict
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("fingerprint", "sampling", "prompt_ids", "seed", "max_new_tokens", "stop_ids")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_IDS_FIELD_NUMBER: _ClassVar[int]
    fingerprint: Fingerprint
    sampling: Sampling
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    max_new_tokens: int
    stop_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, fingerprint: _Optional[_Union[Fingerprint, _Mapping]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., stop_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...
