"""Pull-request review of the datamart: the gate (contract of the published views), the build and its report.

- :mod:`datamart.review.gate`: the checks shared by ``make review`` and ``make promote`` (``CHECKS``).
- :mod:`datamart.review.contract`: the published views may gain columns, never lose, rename or retype one.
- :mod:`datamart.review.run`: builds the branch in ``pr_<branch>`` and gathers categories, data diff, tests.
- :mod:`datamart.review.report`: the Markdown report posted on the pull request.
- :mod:`datamart.review.cli`: ``python -m datamart review``, which runs the review and prints the report.
"""
