"""The machinery under the stages: the plan, request keys, the store, executors, the pipeline."""
