"""Structured outputs and tool calls for local models: the grammar a request's answer follows
(`spec`), its enforcement while decoding (`grammar`, over xgrammar), tools in the prompt of models
without a tool slot (`tool_prompt`), and generated calls turned into streamed deltas
(`tool_parser`). The grammar compilers of the models held are shared by folder (`compilers`)."""

from services.worker.models.structured.compilers import SHARED_COMPILERS, CompilerKey, SharedCompilers
from services.worker.models.structured.grammar import GrammarCompiler, GrammarConstraint
from services.worker.models.structured.spec import grammar_spec
from services.worker.models.structured.tool_parser import ToolCallParser, new_call_id
from services.worker.models.structured.tool_prompt import calls_as_text, result_as_user_text, tool_system_prompt

__all__ = [
    "SHARED_COMPILERS",
    "CompilerKey",
    "GrammarCompiler",
    "GrammarConstraint",
    "SharedCompilers",
    "ToolCallParser",
    "calls_as_text",
    "grammar_spec",
    "new_call_id",
    "result_as_user_text",
    "tool_system_prompt",
]
