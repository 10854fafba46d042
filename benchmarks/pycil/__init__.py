"""Our iCaRL against PyCIL's on one budget: seed by seed (reference_icarl), piece by piece on the same inputs
(reference_icarl_paired) and onward from one shared state (reference_icarl_fork). See README.md here."""
