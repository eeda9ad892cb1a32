from bench.detectors.run import main

raise SystemExit(main())
