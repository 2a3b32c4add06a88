from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "version", "state", "reason", "digest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    state: str
    reason: str
    digest: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

class ReloadPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadPolicyResponse(_message.Message):
    __slots__ = ("accepted", "old_digest", "new_digest", "error")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    OLD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    NEW_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    old_digest: str
    new_digest: str
    error: str
    def __init__(self, accepted: _Optional[bool] = ..., old_digest: _Optional[str] = ..., new_digest: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPolicyResponse(_message.Message):
    __slots__ = ("digest", "model_conf", "policy_csv")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONF_FIELD_NUMBER: _ClassVar[int]
    POLICY_CSV_FIELD_NUMBER: _ClassVar[int]
    digest: str
    model_conf: str
    policy_csv: str
    def __init__(self, digest: _Optional[str] = ..., model_conf: _Optional[str] = ..., policy_csv: _Optional[str] = ...) -> None: ...

class SetShadowPolicyRequest(_message.Message):
    __slots__ = ("directory", "clear")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    directory: str
    clear: bool
    def __init__(self, directory: _Optional[str] = ..., clear: _Optional[bool] = ...) -> None: ...

class ShadowPolicyStatus(_message.Message):
    __slots__ = ("active", "shadow_digest", "directory", "live_digest", "decisions", "disagreements")
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    LIVE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    DISAGREEMENTS_FIELD_NUMBER: _ClassVar[int]
    active: bool
    shadow_digest: str
    directory: str
    live_digest: str
    decisions: int
    disagreements: int
    def __init__(self, active: _Optional[bool] = ..., shadow_digest: _Optional[str] = ..., directory: _Optional[str] = ..., live_digest: _Optional[str] = ..., decisions: _Optional[int] = ..., disagreements: _Optional[int] = ...) -> None: ...

class GetShadowReportRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShadowDisagreement(_message.Message):
    __slots__ = ("subject", "model", "action", "change", "live_rule", "shadow_rule", "count")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    LIVE_RULE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_RULE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    subject: str
    model: str
    action: str
    change: str
    live_rule: str
    shadow_rule: str
    count: int
    def __init__(self, subject: _Optional[str] = ..., model: _Optional[str] = ..., action: _Optional[str] = ..., change: _Optional[str] = ..., live_rule: _Optional[str] = ..., shadow_rule: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class ShadowReport(_message.Message):
    __slots__ = ("active", "shadow_digest", "live_digest", "directory", "decisions", "disagreements", "since", "by_rule", "by_request", "dropped_requests")
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_DIGEST_FIELD_NUMBER: _ClassVar[int]
    LIVE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    DISAGREEMENTS_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    BY_RULE_FIELD_NUMBER: _ClassVar[int]
    BY_REQUEST_FIELD_NUMBER: _ClassVar[int]
    DROPPED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    active: bool
    shadow_digest: str
    live_digest: str
    directory: str
    decisions: int
    disagreements: int
    since: int
    by_rule: _containers.RepeatedCompositeFieldContainer[ShadowDisagreement]
    by_request: _containers.RepeatedCompositeFieldContainer[ShadowDisagreement]
    dropped_requests: int
    def __init__(self, active: _Optional[bool] = ..., shadow_digest: _Optional[str] = ..., live_digest: _Optional[str] = ..., directory: _Optional[str] = ..., decisions: _Optional[int] = ..., disagreements: _Optional[int] = ..., since: _Optional[int] = ..., by_rule: _Optional[_Iterable[_Union[ShadowDisagreement, _Mapping]]] = ..., by_request: _Optional[_Iterable[_Union[ShadowDisagreement, _Mapping]]] = ..., dropped_requests: _Optional[int] = ...) -> None: ...
