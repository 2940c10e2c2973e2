"""Fine-tuning on the stream with no replay: the lower bound."""
from cil.methods.base import Method
from cil.objectives.er import er_loss


class Naive(Method):
    name = "naive"
    uses_buffer = False

    def update(self, batch):
        logits = self.forward(batch.x)
        loss = er_loss(logits, batch.y, self.seen)
        self.report("new", logits, batch.y, self.seen)
        self.step(loss)
        return loss, logits
