"""Request bodies of the Assistants API, validated strictly (unknown parameters rejected, as hosted)."""

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
)
from pydantic_core import PydanticCustomError

MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_LENGTH = 64
MAX_METADATA_VALUE_LENGTH = 512
MAX_TOOLS = 128
MAX_RUN_TOOLS = 20
"""A run's `tools` override holds at most 20 tools (CreateRunRequest, CreateThreadAndRunRequest); an assistant 128."""
MAX_INTEGER = 2**63 - 1
"""The largest integer a field takes (int64, as hosted): the JSON parser reads integers up to 2**64 - 1 exactly,
and those above int64 were stored and echoed as given."""


class Strict(BaseModel):
    """Base of every request model: unknown fields are errors, no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _type_tag(value: Any) -> str | None:
    """Discriminator: `<type>` of a dict, so union labels in error locations are recognisable."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"<{kind}>" if isinstance(kind, str) else None


def _check_metadata(value: dict[str, str]) -> dict[str, str]:
    if len(value) > MAX_METADATA_KEYS:
        raise PydanticCustomError(
            "tl_object_above_max_properties",
            f"Invalid 'metadata': too many properties. Expected an object with at most {MAX_METADATA_KEYS} "
            f"properties, but got an object with {len(value)} properties instead.")
    for key in value:
        if len(key) > MAX_METADATA_KEY_LENGTH:
            raise PydanticCustomError(
                "tl_string_above_max_length",
                f"Invalid 'metadata': key too long. Expected keys with maximum length {MAX_METADATA_KEY_LENGTH}, "
                f"but got a key with length {len(key)} instead.")
    return value


Metadata = Annotated[
    dict[str, Annotated[str, StringConstraints(max_length=MAX_METADATA_VALUE_LENGTH)]],
    AfterValidator(_check_metadata),
]
Integer = Annotated[int, Field(le=MAX_INTEGER)]
"""Every integer field: further bounds are added with another `Field` (`Annotated[Integer, Field(ge=1)]`)."""
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(ge=0, le=1)]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


# --- tools --------------------------------------------------------------------------------------------


class CodeInterpreterToolIn(Strict):
    """`{"type": "code_interpreter"}`."""

    type: Literal["code_interpreter"]


class RankingOptionsIn(Strict):
    """File search ranking options."""

    score_threshold: Annotated[float, Field(ge=0, le=1)]
    ranker: Literal["auto", "default_2024_08_21"] | None = None


class FileSearchIn(Strict):
    """File search overrides."""

    max_num_results: Annotated[Integer, Field(ge=1, le=50)] | None = None
    ranking_options: RankingOptionsIn | None = None


class FileSearchToolIn(Strict):
    """`{"type": "file_search", "file_search": {...}}`."""

    type: Literal["file_search"]
    file_search: FileSearchIn | None = None


class FunctionDefinitionIn(Strict):
    """A function the model may call."""

    name: Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionToolIn(Strict):
    """`{"type": "function", "function": {...}}`."""

    type: Literal["function"]
    function: FunctionDefinitionIn


ToolIn = Annotated[
    Annotated[CodeInterpreterToolIn, Tag("<code_interpreter>")]
    | Annotated[FileSearchToolIn, Tag("<file_search>")]
    | Annotated[FunctionToolIn, Tag("<function>")],
    Discriminator(_type_tag),
]
Tools = Annotated[list[ToolIn], Field(max_length=MAX_TOOLS)]
RunTools = Annotated[list[ToolIn], Field(max_length=MAX_RUN_TOOLS)]


# --- tool resources -------------------------------------------------------------------------------------


def _first_of_each(ids: list[str]) -> list[str]:
    """Each id once, first mention first: a repeated id names the same resource (it was stored twice)."""
    return list(dict.fromkeys(ids))


class CodeInterpreterResourcesIn(Strict):
    """Files for code interpreter."""

    file_ids: Annotated[list[str], Field(max_length=20), AfterValidator(_first_of_each)] | None = None


class FileSearchResourcesIn(Strict):
    """Vector stores for file search."""

    vector_store_ids: Annotated[list[str], Field(max_length=1)] | None = None
    vector_stores: Annotated[list[dict[str, Any]], Field(max_length=1)] | None = None


class ToolResourcesIn(Strict):
    """Resources for the tools, by tool type."""

    code_interpreter: CodeInterpreterResourcesIn | None = None
    file_search: FileSearchResourcesIn | None = None


# --- response format and tool choice --------------------------------------------------------------------


class ResponseFormatTextIn(Strict):
    """`{"type": "text"}`."""

    type: Literal["text"]


class ResponseFormatJsonObjectIn(Strict):
    """`{"type": "json_object"}`."""

    type: Literal["json_object"]


class JsonSchemaIn(Strict):
    """A structured-output schema."""

    name: Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatJsonSchemaIn(Strict):
    """`{"type": "json_schema", "json_schema": {...}}`."""

    type: Literal["json_schema"]
    json_schema: JsonSchemaIn


ResponseFormatIn = (
    Literal["auto"]
    | Annotated[
        Annotated[ResponseFormatTextIn, Tag("<text>")]
        | Annotated[ResponseFormatJsonObjectIn, Tag("<json_object>")]
        | Annotated[ResponseFormatJsonSchemaIn, Tag("<json_schema>")],
        Discriminator(_type_tag),
    ]
)


class ToolChoiceFunctionNameIn(Strict):
    """The function to force."""

    name: str


class ToolChoiceFunctionIn(Strict):
    """Force a function."""

    type: Literal["function"]
    function: ToolChoiceFunctionNameIn


class ToolChoiceBuiltinIn(Strict):
    """Force a built-in tool."""

    type: Literal["code_interpreter", "file_search"]


ToolChoiceIn = (
    Literal["none", "auto", "required"]
    | Annotated[
        Annotated[ToolChoiceFunctionIn, Tag("<function>")]
        | Annotated[ToolChoiceBuiltinIn, Tag("<code_interpreter>")]
        | Annotated[ToolChoiceBuiltinIn, Tag("<file_search>")],
        Discriminator(_type_tag),
    ]
)


class TruncationStrategyIn(Strict):
    """How to truncate the thread for the prompt."""

    type: Literal["auto", "last_messages"]
    last_messages: Annotated[Integer, Field(ge=1)] | None = None


# --- messages -------------------------------------------------------------------------------------------


class TextPartIn(Strict):
    """`{"type": "text", "text": "..."}`."""

    type: Literal["text"]
    text: str


class ImageFileIn(Strict):
    """A reference to an uploaded image."""

    file_id: Annotated[str, StringConstraints(min_length=1)]
    detail: Literal["auto", "low", "high"] | None = None


class ImageFilePartIn(Strict):
    """`{"type": "image_file", "image_file": {...}}`."""

    type: Literal["image_file"]
    image_file: ImageFileIn


class ImageUrlIn(Strict):
    """An image by URL."""

    url: Annotated[str, StringConstraints(pattern=r"^(?i:https?://|data:image/)")]
    detail: Literal["auto", "low", "high"] | None = None


class ImageUrlPartIn(Strict):
    """`{"type": "image_url", "image_url": {...}}`."""

    type: Literal["image_url"]
    image_url: ImageUrlIn


ContentPartIn = Annotated[
    Annotated[TextPartIn, Tag("<text>")]
    | Annotated[ImageFilePartIn, Tag("<image_file>")]
    | Annotated[ImageUrlPartIn, Tag("<image_url>")],
    Discriminator(_type_tag),
]
Content = (Annotated[str, StringConstraints(min_length=1, max_length=256_000)]  # hosted's limit on a string
           | Annotated[list[ContentPartIn], Field(min_length=1)])


class AttachmentToolIn(Strict):
    """A tool an attached file is for."""

    type: Literal["code_interpreter", "file_search"]


class AttachmentIn(Strict):
    """A file attached to a message: `tools` is required, as hosted (a file attached to no tool is never read)."""

    file_id: Annotated[str, StringConstraints(min_length=1)]
    tools: list[AttachmentToolIn]


class MessageIn(Strict):
    """A message to add (message create, thread create, additional_messages)."""

    role: Literal["user", "assistant"]
    content: Content
    attachments: list[AttachmentIn] | None = None
    metadata: Metadata | None = None


class MessageUpdate(Strict):
    """Modify a message: metadata only."""

    metadata: Metadata | None = None


# --- assistants -------------------------------------------------------------------------------------------


class AssistantUpdate(Strict):
    """Modify an assistant: the fields given replace the stored ones."""

    model: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    name: Annotated[str, StringConstraints(max_length=256)] | None = None
    description: Annotated[str, StringConstraints(max_length=512)] | None = None
    instructions: Annotated[str, StringConstraints(max_length=256_000)] | None = None
    tools: Tools | None = None
    tool_resources: ToolResourcesIn | None = None
    metadata: Metadata | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    response_format: ResponseFormatIn | None = None
    reasoning_effort: ReasoningEffort | None = None


class AssistantCreate(AssistantUpdate):
    """Create an assistant: the same fields as a modification, with `model` required."""

    model: Annotated[str, StringConstraints(min_length=1, max_length=256)]


# --- threads ------------------------------------------------------------------------------------------------


class ThreadCreate(Strict):
    """Create a thread, optionally with messages."""

    messages: list[MessageIn] | None = None
    tool_resources: ToolResourcesIn | None = None
    metadata: Metadata | None = None


class ThreadUpdate(Strict):
    """Modify a thread."""

    tool_resources: ToolResourcesIn | None = None
    metadata: Metadata | None = None


# --- runs -------------------------------------------------------------------------------------------------------


class RunOptions(Strict):
    """What a run may override or add, shared by run create and create-thread-and-run."""

    assistant_id: Annotated[str, StringConstraints(min_length=1)]
    model: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    instructions: Annotated[str, StringConstraints(max_length=256_000)] | None = None
    tools: RunTools | None = None
    metadata: Metadata | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool | None = None
    max_prompt_tokens: Annotated[Integer, Field(ge=256)] | None = None  # the contract's minimum
    max_completion_tokens: Annotated[Integer, Field(ge=256)] | None = None
    truncation_strategy: TruncationStrategyIn | None = None
    tool_choice: ToolChoiceIn | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormatIn | None = None
    reasoning_effort: ReasoningEffort | None = None


class RunCreate(RunOptions):
    """Create a run on an existing thread."""

    additional_instructions: Annotated[str, StringConstraints(max_length=256_000)] | None = None
    additional_messages: list[MessageIn] | None = None


class ThreadAndRunCreate(RunOptions):
    """Create a thread and a run on it in one request."""

    thread: ThreadCreate | None = None
    tool_resources: ToolResourcesIn | None = None


class RunUpdate(Strict):
    """Modify a run: metadata only."""

    metadata: Metadata | None = None
