"""The small Dockerfile reading that corrects buildah's shell-form CMD/ENTRYPOINT and port order."""

from __future__ import annotations

from openmicrovm.builder.dockerfile import (
    final_stage_command_forms,
    final_stage_exposed_ports,
    parse_instructions,
)


def test_continuations_comments_and_the_escape_directive() -> None:
    text = "# escape=`\nFROM a\n# a comment\nRUN echo one `\n  # inside\n  two\ncmd echo hi\n"
    assert [(i.keyword, i.arguments) for i in parse_instructions(text)] == [
        ("FROM", "a"),
        ("RUN", "echo one    two"),
        ("CMD", "echo hi"),
    ]


def test_only_the_final_stage_counts() -> None:
    text = 'FROM a AS build\nSHELL ["/bin/bash", "-c"]\nCMD x\nEXPOSE 1\nFROM b\nCMD ["y"]\nEXPOSE 9000 80/udp 8080\n'
    forms = final_stage_command_forms(text)
    assert forms["CMD"].shell_form is False and "ENTRYPOINT" not in forms
    assert final_stage_exposed_ports(text) == ["9000/tcp", "80/udp", "8080/tcp"]


def test_shell_in_effect_is_the_one_before_the_instruction() -> None:
    forms = final_stage_command_forms('FROM a\nENTRYPOINT run\nSHELL ["/bin/bash", "-c"]\nCMD go\n')
    assert forms["ENTRYPOINT"].shell is None
    assert forms["CMD"].shell == ["/bin/bash", "-c"] and forms["CMD"].shell_form
