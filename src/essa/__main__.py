from essa.commands import main

raise SystemExit(main())
