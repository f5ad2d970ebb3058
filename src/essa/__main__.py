from essa.cli import main

raise SystemExit(main())
