"""Stage train: train the CNN on the training digits; write the model, its per-epoch history and the training's
record (when and where it ran, every epoch's metrics, the CPU and memory it used) for the export stage to log.

It does not talk to MLflow; it only checks, before training, that a tracking server it would log to answers.
With train.nproc > 1 it runs in that many processes under torchrun (see ``mnist_pipeline.ml.trainer``); an
interrupted training continues from its last completed epoch (``--resume-state``, removed once it succeeds).
"""

import json
from pathlib import Path

from mnist_pipeline import stage
from mnist_pipeline.files import write_atomic


@stage.command
@stage.path("--data", "folder written by the download stage")
@stage.path("--checkpoint", "the trained model (weights and the model params)")
@stage.path("--history", "per-epoch metrics CSV (a DVC plot)")
@stage.path("--record", "the training's record for the export stage to log (JSON)")
@stage.path("--times", "the training's times and usage, beside the record (JSON; no DVC output: they vary)")
@stage.path("--resume-state", "the last completed epoch's state, while a training is unfinished")
def main(params, data, checkpoint, history, record, times, resume_state):
    from mnist_pipeline.ml import trainer
    from mnist_pipeline.ml.history import write_history
    from mnist_pipeline.ml.model import save_checkpoint
    from mnist_pipeline.tracking import server

    server.check()  # an unreachable server fails now, in seconds, not after training
    # What makes a saved state stale: any edit to this script or to the package (a needless restart costs time only)
    code = [Path(__file__), *sorted(Path(stage.__file__).parent.rglob("*.py"))]
    trained = trainer.train(params.model, params.train, params.runtime, data, resume_state, code)
    if trained is None:  # a rank of several other than rank 0, which writes the outputs
        return
    save_checkpoint(checkpoint, trained.result.model, params.model, {"train_config": params.train.to_dict()})
    write_history(history, trained.result.history)
    fixed, varying = trainer.split_record(trained.record)
    write_atomic(times, json.dumps(varying, indent=1) + "\n")
    write_atomic(record, json.dumps(fixed, indent=1) + "\n")
    resume_state.unlink(missing_ok=True)  # finished: nothing left to resume


if __name__ == "__main__":
    main()
