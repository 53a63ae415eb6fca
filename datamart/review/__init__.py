"""Pull-request review of the datamart: build the branch, gather what changed, write the report.

- :mod:`datamart.review.run`: builds the branch in ``pr_<branch>`` and gathers categories, data diff, tests, and the
  gate's findings (the gate itself is :mod:`datamart.gate`, shared with promotion).
- :mod:`datamart.review.report`: the Markdown report posted on the pull request.
- :mod:`datamart.review.cli`: ``python -m datamart review``, which runs the review and prints the report.
"""
