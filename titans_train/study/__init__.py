"""Recipe-driven scaling studies: a grid of runs from one study file, trained, tabulated, fitted
to L(N, D) = E + A N^-alpha + B D^-beta and plotted (`titans-train study ...`, docs/scaling-study.md)."""
