"""lalora.analysis: the paper's diagnoses and theorems, checked numerically (issue 7, SPEC §6).

  hessian.py    Hessian-vector products, top eigenvalue (Lanczos / power iteration)
  landscape.py  filter-normalised 1-D / 2-D random-direction loss landscapes (Li et al. 2018)
  alignment.py  cosine similarity of client updates ΔA, ΔB, Δ(BA)
  noise.py      ‖N_B N_A‖_F vs σ: Monte Carlo, closed forms, log-log slopes, noise on W per step
  theory.py     gradient coupling, Theorems 1-4, the filter's response and variance factor
  probe.py      drivers over federated runs (global model of a run, sharpness, alignment traces)
  toy.py        a tiny synthetic task for pipeline checks

Pure functions over models, loss closures and tensors; submodules are imported on use.
"""
