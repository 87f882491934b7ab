"""What the providers' terms say about using model outputs, as data: model id → terms.

A preference dataset is made of model outputs, so whoever trains on it inherits the terms of
every model in the pool and of the judge. The Tulu 3 preference data, the reference this
project reproduces, lists its API models (GPT-4 Turbo, GPT-4o, Claude 3.5 Sonnet) and its
Gemma and Llama models each with the terms their outputs are subject to. This module holds
that knowledge for the dataset card:

* ``TERMS``: licence id (as written in a config's ``license:``) → ``OutputTerms``: provider,
  terms name, link, and the one-line caveat on outputs the card prints;
* ``licence_for_model``: the licence id a model id implies (``claude-3-5-sonnet-20241022`` →
  ``anthropic``, ``meta-llama/Llama-3.1-70B-Instruct`` → ``llama3.1``), so a model configured
  with ``license: unknown`` (the default) still gets its caveat, and a licence that contradicts
  the model id can be flagged;
* ``output_terms(model, licence)``: the terms to print for one configured model.

The caveats are summaries for a reader deciding whether to look closer, not legal text: the
card links the terms themselves. Pure data and functions; no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OutputTerms:
    """The terms one provider puts on its models' outputs."""

    licence: str  # the licence id used in configs
    provider: str  # OpenAI, Anthropic, Google, Meta
    name: str  # the terms' title
    url: str
    caveat: str  # one line for the card's licence table
    #: the terms restrict training other models on the outputs (the flag the card raises)
    restricts_training: bool = True


TERMS: dict[str, OutputTerms] = {t.licence: t for t in (
    OutputTerms("openai", "OpenAI", "OpenAI Terms of Use / Services Agreement",
                "https://openai.com/policies/terms-of-use",
                "outputs may not be used to develop models that compete with OpenAI"),
    OutputTerms("anthropic", "Anthropic", "Anthropic Commercial Terms of Service",
                "https://www.anthropic.com/legal/commercial-terms",
                "outputs may not be used to build a competing product or service, including "
                "training competing AI models"),
    OutputTerms("gemini", "Google", "Gemini API Additional Terms of Service",
                "https://ai.google.dev/gemini-api/terms",
                "outputs may not be used to develop models that compete with Gemini"),
    OutputTerms("gemma", "Google", "Gemma Terms of Use", "https://ai.google.dev/gemma/terms",
                "models trained on outputs to perform like Gemma are Gemma derivatives: the "
                "Gemma terms and prohibited-use policy pass on to them"),
    OutputTerms("llama2", "Meta", "Llama 2 Community License",
                "https://ai.meta.com/llama/license/",
                "outputs may not be used to improve other large language models (Llama 2 "
                "derivatives excepted); 700M monthly active users need a licence from Meta"),
    OutputTerms("llama3", "Meta", "Meta Llama 3 Community License",
                "https://www.llama.com/llama3/license/",
                "outputs may not be used to improve other large language models (Llama 3 "
                "derivatives excepted); models trained on them must be named 'Llama 3 ...'; "
                "700M monthly active users need a licence from Meta"),
    *(OutputTerms(f"llama{v}", "Meta", f"Llama {v} Community License",
                  f"https://www.llama.com/llama{v.replace('.', '_')}/license/",
                  "models trained on outputs and distributed must have names starting with "
                  "'Llama' and display 'Built with Llama'; 700M monthly active users need a "
                  "licence from Meta") for v in ("3.1", "3.2", "3.3", "4")),
)}

#: model-id patterns → licence id, first match wins. Matched against the id lower-cased with
#: any ``provider/`` prefix and Bedrock/Vertex decorations left in (patterns are searched, not
#: anchored at the start, except where a short prefix would be ambiguous).
MODEL_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), lic) for p, lic in (
        (r"gpt-oss", "apache-2.0"),  # OpenAI's open-weight models: Apache 2.0, no output terms
        (r"(^|/)(gpt-[345]|gpt-4o|chatgpt-|o[1345](-|$)|text-davinci|davinci-0)", "openai"),
        (r"claude", "anthropic"),
        (r"gemini", "gemini"),
        (r"gemma", "gemma"),
        (r"llama-?2", "llama2"),
        (r"llama-?3[.-]1(\b|-|$)", "llama3.1"),
        (r"llama-?3[.-]2(\b|-|$)", "llama3.2"),
        (r"llama-?3[.-]3(\b|-|$)", "llama3.3"),
        (r"llama-?4", "llama4"),
        (r"llama-?3(?![.\d])", "llama3"),
    )
)


def licence_for_model(model: str) -> str | None:
    """The licence id a model id implies, or ``None`` when prefsynth does not know it."""
    name = model.strip().lower()
    for pattern, lic in MODEL_RULES:
        if pattern.search(name):
            return lic
    return None


def output_terms(model: str, licence: str = "unknown") -> OutputTerms | None:
    """The output terms to state for a configured model: those of its ``license`` when known,
    else those its model id implies; ``None`` when neither carries output terms."""
    known = TERMS.get(licence.strip().lower())
    if known is not None:
        return known
    implied = licence_for_model(model)
    return TERMS.get(implied) if implied is not None else None


def licence_mismatch(model: str, licence: str) -> str | None:
    """A warning when the configured licence contradicts the model id's provider (a Claude
    model configured as ``apache-2.0``), else ``None``. ``unknown`` never contradicts."""
    implied = licence_for_model(model)
    lic = licence.strip().lower()
    if implied is None or lic in ("", "unknown") or implied not in TERMS:
        return None
    same = TERMS.get(lic)
    if lic == implied or (same is not None and same.provider == TERMS[implied].provider):
        return None
    provider = TERMS[implied].provider
    article = "an" if provider[0] in "AEIOU" else "a"
    return (f"{model} is {article} {provider} model ({TERMS[implied].name}), but its "
            f"license is set to {licence!r}")


__all__ = ["MODEL_RULES", "TERMS", "OutputTerms", "licence_for_model", "licence_mismatch",
           "output_terms"]
