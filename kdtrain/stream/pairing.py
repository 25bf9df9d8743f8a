"""Which teacher replica serves which student micro-batch (pure arithmetic, no torch.distributed).

A step's global batch of G samples is cut into N = G / m micro-batches of m samples (the teacher
and the student use the same micro-batch size, so one teacher forward serves exactly one student
micro-batch). Student replica ``r`` of ``Ds`` owns samples ``[r*G/Ds, (r+1)*G/Ds)`` (as in
pretraining, kdtrain/training/batches.py) and consumes its micro-batches ``j = 0 .. N/Ds - 1``
in order.

Every micro-batch of the step gets a *sequence number* that interleaves the student replicas:

    o(r, j) = j * Ds + r                 (so o runs 0 .. N-1)

and teacher replica ``t`` of ``Dt`` serves the micro-batches with ``o % Dt == t``, in increasing
``o``. Properties this buys:

* **Any Dt, Ds.** Equal, one dividing the other, or neither: the only requirement is
  ``N % Dt == 0`` so that every teacher replica does the same work per step (checked by the
  config, which names ``training.global_batch_size``).
* **No copies when colocated.** With ``Dt == Ds`` teacher replica ``r`` serves exactly student
  replica ``r``; when both roles also have the same TP/PP layout on the same ranks the payload
  never leaves the rank.
* **Overlap.** Teachers produce micro-batches in the order the student replicas, running side by
  side, need them (0 of every replica, then 1 of every replica, ...).
* **Deadlock freedom.** Every teacher sends, and every student receives, in increasing ``o``.
  Take the smallest ``o`` not yet received: all smaller sequence numbers were received, so its
  teacher is not blocked on an earlier send and will produce it, and its student has consumed all
  of its own earlier micro-batches and is waiting for it. So some transfer always makes progress,
  whatever the in-flight depth.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pairing:
    num_microbatches: int  # N: micro-batches per global batch
    dp_teacher: int
    dp_student: int

    def __post_init__(self):
        n, dt, ds = self.num_microbatches, self.dp_teacher, self.dp_student
        if min(n, dt, ds) < 1:
            raise ValueError(f"pairing: sizes must be >= 1, got N={n}, dp_teacher={dt}, dp_student={ds}")
        if n % ds:
            raise ValueError(f"pairing: {n} micro-batches per step do not split over {ds} student replicas")
        if n % dt:
            raise ValueError(f"pairing: {n} micro-batches per step do not split evenly over {dt} teacher replicas")

    @property
    def per_student(self) -> int:
        return self.num_microbatches // self.dp_student

    @property
    def per_teacher(self) -> int:
        return self.num_microbatches // self.dp_teacher

    def sequence(self, student_replica: int, j: int) -> int:
        assert 0 <= student_replica < self.dp_student and 0 <= j < self.per_student
        return j * self.dp_student + student_replica

    def student_of(self, o: int) -> tuple[int, int]:
        """(student replica, its micro-batch index) of sequence number ``o``."""
        return o % self.dp_student, o // self.dp_student

    def teacher_of(self, o: int) -> int:
        return o % self.dp_teacher

    def teacher_work(self, teacher_replica: int) -> list[int]:
        """Sequence numbers a teacher replica serves, in the order it must serve them."""
        return list(range(teacher_replica, self.num_microbatches, self.dp_teacher))

    def student_work(self, student_replica: int) -> list[int]:
        return [self.sequence(student_replica, j) for j in range(self.per_student)]
