from eir.cli import main

raise SystemExit(main())
