"""Prompt templates of the CLIP annotator and question templates of image-text-to-text annotators.

Each template has exactly one ``{}`` that receives a class description. Two named sets exist:

- ``paper27``: the 27 "small ImageNet" templates of the Co-Reg paper (appendix A.1), in the
  paper's order; the reference code (github Portugas0807/Co-Reg, ``utils/utils_experi.py``,
  ``imagenet_templates_small``) uses the same list. Template 0, ``"a photo of a {}"``, gives the
  single noisy label of the noisy-label baselines (``single_template: 0``).
- ``openai80``: the 80 ImageNet templates of the CLIP paper (Radford et al. 2021, the
  ``Prompt_Engineering_for_ImageNet`` notebook; also ``open_clip.OPENAI_IMAGENET_TEMPLATES``), in
  that order. Their template 0 is ``"a bad photo of a {}."``: to take the single noisy label from
  ``"a photo of a {}."`` with this set, use ``single_template: 39``.

Question templates of the ``vlm`` annotator instead list every class as a choice, through the
placeholders ``{classes}`` (names, comma-separated) and ``{options}`` (one ``A. name`` line per
class): named sets ``paper_choices`` (the paper's style, 5 questions), ``lettered`` (2
multiple-choice questions) and ``single``; any other placeholder, or a template without choices,
is refused when the grid is validated.
"""

from __future__ import annotations

PAPER_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

OPENAI_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"paper27": PAPER_TEMPLATES, "openai80": OPENAI_TEMPLATES}


def templates_for(spec_templates: str | list[str] | tuple[str, ...]) -> list[str]:
    """Resolve grid.yaml ``templates:`` (a set name or an explicit list) to the list of templates."""
    if isinstance(spec_templates, str):
        try:
            return list(TEMPLATE_SETS[spec_templates])
        except KeyError:
            raise ValueError(
                f"unknown template set {spec_templates!r}; allowed: {', '.join(TEMPLATE_SETS)} or a list of templates"
            ) from None
    templates = list(spec_templates)
    if not templates:
        raise ValueError("the template list is empty")
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise ValueError(f"each template needs exactly one '{{}}' for the class name; bad: {bad}")
    return templates


# --------------------------------------------------------------------------------------------
# Question templates of image-text-to-text (LLaVA-style) annotators

VLM_PLACEHOLDERS = {
    "classes": "every class name, comma-separated, in label order",
    "options": "one line per class, 'A. name' (letters up to 26 classes, numbers above)",
}
"""Placeholders a question template may use; it needs at least one of them (the choices)."""

VLM_PAPER_TEMPLATES: tuple[str, ...] = (
    "What is the main object in this image? Choose one of the following: {classes}. Answer with the name only.",
    "Which of these categories does the image belong to: {classes}? Answer with one category.",
    "Classify this image into one of the classes {classes}. Reply with the class name.",
    "Question: what is shown in the picture? Options: {classes}. Answer:",
    "Look at the image and pick the label that fits it best from this list: {classes}. Give only the label.",
)
"""The Co-Reg paper's style (section III): several questions, each listing every class name as a
choice; the paper does not print its LLaVA prompts, so these are written in that style."""

VLM_LETTERED_TEMPLATES: tuple[str, ...] = (
    "What is shown in this image?\n{options}\nAnswer with the option's letter from the given choices directly.",
    "Which option describes the image best?\n{options}\nAnswer with the letter only.",
)
"""Multiple-choice style (LLaVA-1.5's own evaluation prompt for lettered choices): answers may be a
choice label."""

VLM_TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "paper_choices": VLM_PAPER_TEMPLATES,
    "lettered": VLM_LETTERED_TEMPLATES,
    "single": VLM_PAPER_TEMPLATES[:1],
}


def vlm_template_problems(template: str) -> list[str]:
    """Why ``template`` is not a valid question template (empty: it is)."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        return [f"{template!r}: {err} (write a literal brace as '{{{{' or '}}}}')"]
    problems = [
        f"{template!r}: unknown placeholder {{{f}}}; allowed: "
        + ", ".join(f"{{{p}}}" for p in VLM_PLACEHOLDERS)
        for f in fields
        if f not in VLM_PLACEHOLDERS
    ]
    if not any(f in VLM_PLACEHOLDERS for f in fields):
        problems.append(f"{template!r}: lists no choices; it needs {{classes}} or {{options}}")
    return problems


def vlm_templates_for(spec_templates: str | list[str] | tuple[str, ...]) -> list[str]:
    """Resolve a VLM annotator's ``templates:`` (a set name or an explicit list) to question templates."""
    if isinstance(spec_templates, str):
        try:
            return list(VLM_TEMPLATE_SETS[spec_templates])
        except KeyError:
            raise ValueError(
                f"unknown VLM template set {spec_templates!r}; allowed: {', '.join(VLM_TEMPLATE_SETS)} or a list"
            ) from None
    templates = list(spec_templates)
    problems = [p for t in templates for p in vlm_template_problems(t)] or ([] if templates else ["the list is empty"])
    if problems:
        raise ValueError("; ".join(problems))
    return templates
