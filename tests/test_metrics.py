import numpy as np
import pytest

from cil.core import metrics

# Hand-computed: 3 tasks. After task 0: [90]; after 1: [70, 80]; after 2: [60, 50, 85].
ACC = [[90.0, 0.0, 0.0], [70.0, 80.0, 0.0], [60.0, 50.0, 85.0]]


def test_final_average_accuracy_uses_last_row_seen_tasks():
    assert metrics.final_average_accuracy(ACC) == pytest.approx((60 + 50 + 85) / 3)


def test_average_forgetting_is_max_previous_minus_final():
    # task 0: max(90, 70) - 60 = 30; task 1: max(80) - 50 = 30
    assert metrics.average_forgetting(ACC) == pytest.approx(30.0)
    # forgetting uses the best earlier accuracy, not the first one
    acc = [[50.0, 0.0, 0.0], [70.0, 80.0, 0.0], [65.0, 80.0, 85.0]]
    assert metrics.average_forgetting(acc) == pytest.approx(((70 - 65) + (80 - 80)) / 2)


def test_average_incremental_accuracy():
    assert metrics.average_incremental_accuracy(ACC) == pytest.approx((90 + 75 + 65) / 3)


def test_single_task_has_no_forgetting_and_partial_matrix_works():
    assert metrics.average_forgetting([[88.0, 0.0]]) is None
    assert metrics.final_average_accuracy([[88.0, 0.0]]) == 88.0


def test_anytime_accuracy_is_curve_mean():
    assert metrics.anytime_accuracy([10.0, 20.0, 60.0]) == pytest.approx(30.0)
    assert metrics.anytime_accuracy([]) is None


def test_bad_matrix_shape_rejected():
    with pytest.raises(ValueError):
        metrics.final_average_accuracy([[1.0], [2.0]])


def test_confusion_matrix_counts_target_prediction_pairs():
    conf = metrics.confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 0], 3)
    assert conf.tolist() == [[1, 1, 0], [0, 1, 0], [2, 0, 1]]


def test_error_breakdown_splits_errors_by_the_task_of_the_predicted_class():
    # classes 0, 1: task 0; classes 2, 3: task 1; class 4: task 2 (not seen yet); class 5: in no task.
    class_task = [0, 0, 1, 1, 2, -1]
    conf = [
        [5, 1, 2, 0, 0, 0],  # class 0: 5 right, 1 within its task, 2 to a newer task
        [0, 6, 1, 1, 0, 0],  # class 1: 6 right, 2 to a newer task
        [3, 0, 4, 1, 0, 0],  # class 2: 4 right, 1 within, 3 to an older task
        [0, 0, 0, 8, 0, 0],
        [9, 9, 9, 9, 9, 0],  # task 2 is not seen: left out
        [7, 0, 0, 0, 0, 0],
    ]  # class 5 is in no task: left out
    out = metrics.error_breakdown(np.array(conf), class_task, tasks_seen=2)
    total = 8 + 8 + 8 + 8
    assert out == pytest.approx(
        {
            "correct": 100 * 23 / total,
            "within_task": 100 * 2 / total,
            "to_newer_task": 100 * 4 / total,
            "to_older_task": 100 * 3 / total,
        }
    )
