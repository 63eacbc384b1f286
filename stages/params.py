"""Stage params: check the whole of params.yaml before any other stage starts.

DVC deletes a stage's outputs before it runs the stage's command. A typo caught by the stage itself (``optimizer:
adma``) would then cost the last good run's outputs, and those DVC does not cache (``reports/history.csv``) for
good. This stage reads every section and is upstream of every other, so a typo stops ``dvc repro`` here, with all
of the file's mistakes in one line, before DVC touches another stage's outputs. What it writes depends on the
checks, not on the values, so a valid change of a value reruns only the stages that read it.
"""

from mnist_pipeline import stage
from mnist_pipeline.files import write_atomic


@stage.command
@stage.path("--out", "written when params.yaml passes every check: the sections and keys it checks")
def main(params, out):
    lines = [f"{section.SECTION}: {', '.join(type(section).model_fields)}" for section in params.sections()]
    write_atomic(out, "# the keys of params.yaml that the params stage checks\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
