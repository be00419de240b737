"""`autoopt optimize --script`: an unmodified training script driven in its own process per
configuration.

- target: the script as the user named it (path, arguments, working directory), checked;
- facts: what a running script shows (model, optimizer, batches, loaders, torch settings) as
  the rules' model.* / workload.* facts, and the user's source line on the live stack;
- driver: the child (`python -m autoopt.scripting.driver SPEC.json`): hooks installed before
  the script runs apply a configuration and pace it at optimizer.step();
- protocol: the spec and the messages between the child and autoopt;
- worker: the parent's handle on one child;
- evaluator: ScriptEvaluator, the search's Evaluator over script workers;
- workload: the Workload the transforms and rules decide on, from the facts alone.
"""
