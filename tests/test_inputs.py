"""Input validation (one place for every model), seeds and the output path."""

from __future__ import annotations

import logging

import pytest
from cog import Input, Path

from errors import InputError
from inputs import resolve_seed, validate_inputs
from media import output_path
from reporting import configure_logging, logger


class Runner:
    @validate_inputs
    def run(
        self,
        image: Path = Input(description="an image"),
        prompt: str = Input(description="prompt", default=""),
        steps: int = Input(description="steps", ge=1, le=100, default=50),
        scale: float = Input(description="scale", ge=1.0, le=20.0, default=6.0),
        frames: int = Input(description="frames", choices=[9, 17, 49], default=49),
        flag: bool = Input(description="flag", default=True),
        sizing_strategy: str = Input(
            description="fit", choices=["center_crop", "pad", "stretch"], default="center_crop"
        ),
        seed: int | None = Input(description="seed", ge=0, le=4294967295, default=None),
    ) -> dict:
        return dict(locals())


IMAGE = Path("/tmp/x.png")


def run(**inputs: object) -> dict:
    values = Runner().run(**inputs)
    values.pop("self")
    return values


def test_defaults_fill_what_the_schemaless_server_leaves_out() -> None:
    # Without an OpenAPI schema, Cog passes the Input() objects themselves for inputs not given.
    values = run(image=IMAGE, steps=Runner.run.__wrapped__.__defaults__[2])
    assert values == {
        "image": IMAGE,
        "prompt": "",
        "steps": 50,
        "scale": 6.0,
        "frames": 49,
        "flag": True,
        "sizing_strategy": "center_crop",
        "seed": None,
    }


def test_numbers_are_coerced_only_when_lossless() -> None:
    values = run(image=IMAGE, steps=10.0, scale=7)
    assert values["steps"] == 10 and isinstance(values["steps"], int)
    assert values["scale"] == 7.0 and isinstance(values["scale"], float)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "Missing input `image`: it is required."),
        ({"image": IMAGE, "steps": 0}, "Invalid input `steps`: must be >= 1 and <= 100 (got 0)."),
        ({"image": IMAGE, "steps": 101}, "Invalid input `steps`: must be >= 1 and <= 100 (got 101)."),
        ({"image": IMAGE, "scale": 20.5}, "Invalid input `scale`: must be >= 1.0 and <= 20.0 (got 20.5)."),
        ({"image": IMAGE, "frames": 50}, "Invalid input `frames`: must be one of 9, 17, 49 (got 50)."),
        ({"image": IMAGE, "sizing_strategy": "zoom"}, "Invalid input `sizing_strategy`: must be one of center_crop"),
        ({"image": IMAGE, "steps": "ten"}, "Invalid input `steps`: expected int, got 'ten'."),
        ({"image": IMAGE, "steps": 2.5}, "Invalid input `steps`: expected int, got 2.5."),
        ({"image": IMAGE, "steps": True}, "Invalid input `steps`: expected int, got True."),
        ({"image": IMAGE, "flag": "yes"}, "Invalid input `flag`: expected bool, got 'yes'."),
        ({"image": IMAGE, "seed": "7"}, "Invalid input `seed`: expected int, got '7'."),
        ({"image": "not-a-path"}, "Invalid input `image`: expected a file or URL, got 'not-a-path'."),
        ({"image": IMAGE, "num_steps": 3}, "Unknown input `num_steps`: allowed inputs are image, prompt, steps,"),
    ],
)
def test_bad_inputs_name_the_input_and_the_allowed_values(inputs: dict, message: str) -> None:
    with pytest.raises(InputError) as error:
        run(**inputs)
    assert str(error.value).startswith(message)


def test_bounds_are_inclusive() -> None:
    assert run(image=IMAGE, steps=1)["steps"] == 1
    assert run(image=IMAGE, steps=100, scale=20.0)["scale"] == 20.0


def test_seed_is_kept_or_drawn_and_logged() -> None:
    """The seed used is in the prediction's log (the "predict" logger), drawn or given, so a video can be remade."""
    configure_logging()  # as setup() does: INFO to stdout
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        assert resolve_seed(1234) == 1234
        drawn = [resolve_seed(None) for _ in range(5)]
    finally:
        logger.removeHandler(handler)
    assert len(set(drawn)) > 1 and all(0 <= s < 2**32 for s in drawn)
    assert messages == [f"Using seed: {seed}" for seed in [1234, *drawn]]


def test_output_path_is_reused_so_outputs_do_not_pile_up() -> None:
    first = output_path()
    first.write_bytes(b"old")
    second = output_path()
    assert second == first and not second.exists()
