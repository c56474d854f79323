"""Datasets as plain Python splits, plus Lightning DataModules that tokenize and batch them."""
from opdf_exp.data.glue_tasks import (GLUE_AVERAGE_EXCLUDES, GLUE_TASKS, GlueTask, check_label_mapping,
                                      check_problem_type, glue_average, glue_task, label_mapping, report_sets,
                                      task_score)
from opdf_exp.data.sources import TextExamples, TextSplits, bbc_news, glue, half_dev_indices, read_glue_tsv
from opdf_exp.data.images import (ImageClassificationDataModule, ImageExamples, ImageSplits, hub_images, image_folder,
                                  mnist_digits)
from opdf_exp.data.module import ClassificationDataModule, ResumableRandomSampler
from opdf_exp.data.text import TextClassificationDataModule

__all__ = ["GLUE_AVERAGE_EXCLUDES", "GLUE_TASKS", "ClassificationDataModule", "GlueTask", "ImageClassificationDataModule",
           "ImageExamples", "ImageSplits", "ResumableRandomSampler", "TextExamples", "TextSplits", "hub_images",
           "image_folder", "mnist_digits",
           "TextClassificationDataModule", "bbc_news", "check_label_mapping", "check_problem_type", "glue",
           "glue_average", "glue_task", "half_dev_indices", "label_mapping", "read_glue_tsv", "report_sets",
           "task_score"]
